//! The one SQL layer both backends share: statements are written once, as
//! text valid on SQLite and PostgreSQL alike (`$n` parameters, `ON CONFLICT`,
//! `RETURNING`), with their arguments as backend-neutral [`Arg`]s. What truly
//! differs lives in small named pieces:
//!
//! * [`Backend`]'s `lock`, `lock_shared`, `skip_locked` and `late_commits`:
//!   the lock suffixes and whether numbers can commit late;
//! * how an [`Arg`] is bound and a [`Row`] column read (times are Unix
//!   microseconds and ids UUID text on SQLite; `TIMESTAMPTZ`, `UUID` and
//!   `JSONB` on PostgreSQL): `bind_sqlite` / `bind_pg` here, and the
//!   `read_*` functions;
//! * [`WriteConn`]: the per-backend operations of a write transaction (load,
//!   lock and save an org's billing state; announce live messages; record a
//!   configuration change), implemented in `sqlite.rs` and `postgres.rs`.
//!
//! Shared code takes `&mut dyn SqlConn` (any connection, reads) or
//! `&mut dyn WriteConn` (inside a write transaction), so it is plain Rust that
//! tools can see, not a macro expanded per backend.

use std::borrow::Cow;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use flywheel_domain::billing::org::OrgState;
use flywheel_domain::project::ProjectId;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Postgres, Row as _, Sqlite};

use crate::{Backend, StoreError};

/// One statement argument, in the domain's terms; each backend binds it in
/// its own column type.
#[derive(Debug, Clone)]
pub(crate) enum Arg<'a> {
    Text(Option<Cow<'a, str>>),
    I64(Option<i64>),
    I32(Option<i32>),
    Bool(Option<bool>),
    Time(Option<DateTime<Utc>>),
    Json(Option<Cow<'a, serde_json::Value>>),
    Project(ProjectId),
    /// An id column that is `UUID` on PostgreSQL.
    Uuid(uuid::Uuid),
    Bytes(&'a [u8]),
}

/// A project id argument.
pub(crate) fn arg_project(project: ProjectId) -> Arg<'static> {
    Arg::Project(project)
}

/// A time argument.
pub(crate) fn arg_time(at: DateTime<Utc>) -> Arg<'static> {
    Arg::Time(Some(at))
}

/// A nullable time argument.
pub(crate) fn arg_opt_time(at: Option<DateTime<Utc>>) -> Arg<'static> {
    Arg::Time(at)
}

/// A JSON document argument.
pub(crate) fn arg_json(value: &serde_json::Value) -> Arg<'_> {
    Arg::Json(Some(Cow::Borrowed(value)))
}

/// A nullable JSON document argument.
pub(crate) fn arg_opt_json(value: Option<&serde_json::Value>) -> Arg<'_> {
    Arg::Json(value.map(Cow::Borrowed))
}

/// A UUID id argument (not a project id: see [`arg_project`]).
pub(crate) fn arg_uuid(id: uuid::Uuid) -> Arg<'static> {
    Arg::Uuid(id)
}

/// A binary argument.
pub(crate) fn arg_bytes(bytes: &[u8]) -> Arg<'_> {
    Arg::Bytes(bytes)
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Arg::Text(Some(Cow::Borrowed(value)))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Arg::Text(Some(Cow::Borrowed(value)))
    }
}

impl From<String> for Arg<'_> {
    fn from(value: String) -> Self {
        Arg::Text(Some(Cow::Owned(value)))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Arg::Text(value.map(Cow::Borrowed))
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Arg::Text(value.as_deref().map(Cow::Borrowed))
    }
}

impl<'a> From<Option<&'a String>> for Arg<'a> {
    fn from(value: Option<&'a String>) -> Self {
        Arg::Text(value.map(|v| Cow::Borrowed(v.as_str())))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(value: Option<String>) -> Self {
        Arg::Text(value.map(Cow::Owned))
    }
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Arg::I64(Some(value))
    }
}

impl From<&i64> for Arg<'_> {
    fn from(value: &i64) -> Self {
        Arg::I64(Some(*value))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(value: Option<i64>) -> Self {
        Arg::I64(value)
    }
}

impl From<i32> for Arg<'_> {
    fn from(value: i32) -> Self {
        Arg::I32(Some(value))
    }
}

impl From<Option<i32>> for Arg<'_> {
    fn from(value: Option<i32>) -> Self {
        Arg::I32(value)
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Arg::Bool(Some(value))
    }
}

/// A statement and its arguments, in order (`$1`, `$2`, …).
#[derive(Debug, Clone)]
pub(crate) struct Sql<'a> {
    text: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

/// A statement.
pub(crate) fn query<'a>(text: impl Into<Cow<'a, str>>) -> Sql<'a> {
    Sql {
        text: text.into(),
        args: Vec::new(),
    }
}

/// A statement whose answer is its first column.
pub(crate) fn query_scalar<'a>(text: impl Into<Cow<'a, str>>) -> Scalar<'a> {
    Scalar(query(text))
}

/// What an `execute` changed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    rows_affected: u64,
}

impl Done {
    pub(crate) fn new(rows_affected: u64) -> Self {
        Done { rows_affected }
    }

    pub(crate) fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

impl<'a> Sql<'a> {
    pub(crate) fn bind(mut self, arg: impl Into<Arg<'a>>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    pub(crate) fn args(&self) -> &[Arg<'a>] {
        &self.args
    }

    pub(crate) async fn execute(self, conn: &mut dyn SqlConn) -> Result<Done, sqlx::Error> {
        conn.execute(self).await
    }

    pub(crate) async fn fetch_all(self, conn: &mut dyn SqlConn) -> Result<Vec<Row>, sqlx::Error> {
        conn.fetch_all(self).await
    }

    pub(crate) async fn fetch_optional(
        self,
        conn: &mut dyn SqlConn,
    ) -> Result<Option<Row>, sqlx::Error> {
        conn.fetch_optional(self).await
    }

    pub(crate) async fn fetch_one(self, conn: &mut dyn SqlConn) -> Result<Row, sqlx::Error> {
        conn.fetch_optional(self)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }
}

/// A statement read by its first column ([`query_scalar`]).
#[derive(Debug, Clone)]
pub(crate) struct Scalar<'a>(Sql<'a>);

impl<'a> Scalar<'a> {
    pub(crate) fn bind(self, arg: impl Into<Arg<'a>>) -> Self {
        Scalar(self.0.bind(arg))
    }

    pub(crate) async fn fetch_one<T: Column>(
        self,
        conn: &mut dyn SqlConn,
    ) -> Result<T, sqlx::Error> {
        self.0.fetch_one(conn).await?.try_get(0)
    }

    pub(crate) async fn fetch_optional<T: Column>(
        self,
        conn: &mut dyn SqlConn,
    ) -> Result<Option<T>, sqlx::Error> {
        self.0
            .fetch_optional(conn)
            .await?
            .map(|row| row.try_get(0))
            .transpose()
    }

    pub(crate) async fn fetch_all<T: Column>(
        self,
        conn: &mut dyn SqlConn,
    ) -> Result<Vec<T>, sqlx::Error> {
        self.0
            .fetch_all(conn)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect()
    }
}

/// A result row of either backend.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

/// A type both backends decode the same way (text, integers, booleans).
/// Times, JSON and ids differ: read them with the `read_*` functions. So do
/// integer widths: PostgreSQL's `INTEGER` is 32 bits (read `i32`, or
/// `CAST(… AS BIGINT)` to read `i64`), SQLite's always 64.
pub(crate) trait Column:
    for<'r> sqlx::Decode<'r, Sqlite>
    + sqlx::Type<Sqlite>
    + for<'r> sqlx::Decode<'r, Postgres>
    + sqlx::Type<Postgres>
{
}

impl<T> Column for T where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
{
}

/// A column position or name of either backend's rows.
pub(crate) trait RowIndex:
    sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow> + std::fmt::Debug
{
}

impl<I> RowIndex for I where
    I: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow> + std::fmt::Debug
{
}

impl Row {
    pub(crate) fn try_get<T: Column, I: RowIndex>(&self, index: I) -> Result<T, sqlx::Error> {
        match self {
            Row::Sqlite(row) => row.try_get(index),
            Row::Pg(row) => row.try_get(index),
        }
    }
}

/// Reads a time column (SQLite: Unix microseconds).
pub(crate) fn read_time(row: &Row, column: &str) -> Result<DateTime<Utc>, StoreError> {
    match row {
        Row::Sqlite(row) => micros_to_time(row.try_get(column)?),
        Row::Pg(row) => Ok(row.try_get(column)?),
    }
}

/// Reads a nullable time column.
pub(crate) fn read_opt_time(row: &Row, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    match row {
        Row::Sqlite(row) => row
            .try_get::<Option<i64>, _>(column)?
            .map(micros_to_time)
            .transpose(),
        Row::Pg(row) => Ok(row.try_get(column)?),
    }
}

/// Reads a JSON column (SQLite: its text).
pub(crate) fn read_json(row: &Row, column: &str) -> Result<serde_json::Value, StoreError> {
    match row {
        Row::Sqlite(row) => {
            serde_json::from_str(&row.try_get::<String, _>(column)?).map_err(StoreError::internal)
        }
        Row::Pg(row) => Ok(row.try_get(column)?),
    }
}

/// Reads a nullable JSON column.
pub(crate) fn read_opt_json(
    row: &Row,
    column: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    match row {
        Row::Sqlite(row) => row
            .try_get::<Option<String>, _>(column)?
            .map(|text| serde_json::from_str(&text).map_err(StoreError::internal))
            .transpose(),
        Row::Pg(row) => Ok(row.try_get(column)?),
    }
}

/// Reads a UUID id column (SQLite: UUID text).
pub(crate) fn read_uuid(row: &Row, column: &str) -> Result<uuid::Uuid, StoreError> {
    match row {
        Row::Sqlite(row) => {
            let text: String = row.try_get(column)?;
            uuid::Uuid::parse_str(&text).map_err(StoreError::internal)
        }
        Row::Pg(row) => Ok(row.try_get(column)?),
    }
}

/// Reads a project id column (SQLite: UUID text).
pub(crate) fn read_project(row: &Row, column: &str) -> Result<ProjectId, StoreError> {
    read_uuid(row, column).map(ProjectId)
}

/// SQLite's times are Unix microseconds.
pub(crate) fn micros_to_time(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        StoreError::internal(sqlx::Error::Decode(
            format!("timestamp out of range: {micros} µs").into(),
        ))
    })
}

/// A statement bound for SQLite.
pub(crate) fn bind_sqlite<'q>(sql: &'q Sql<'_>) -> Query<'q, Sqlite, SqliteArguments<'q>> {
    sql.args()
        .iter()
        .fold(sqlx::query(sql.text()), |query, arg| match arg {
            Arg::Text(text) => query.bind(text.as_deref()),
            Arg::I64(value) => query.bind(*value),
            Arg::I32(value) => query.bind(*value),
            Arg::Bool(value) => query.bind(*value),
            Arg::Time(at) => query.bind(at.map(|at| at.timestamp_micros())),
            Arg::Json(value) => query.bind(value.as_ref().map(|value| value.to_string())),
            Arg::Project(project) => query.bind(project.0.to_string()),
            Arg::Uuid(id) => query.bind(id.to_string()),
            Arg::Bytes(bytes) => query.bind(*bytes),
        })
}

/// A statement bound for PostgreSQL.
pub(crate) fn bind_pg<'q>(sql: &'q Sql<'_>) -> Query<'q, Postgres, PgArguments> {
    sql.args()
        .iter()
        .fold(sqlx::query(sql.text()), |query, arg| match arg {
            Arg::Text(text) => query.bind(text.as_deref()),
            Arg::I64(value) => query.bind(*value),
            Arg::I32(value) => query.bind(*value),
            Arg::Bool(value) => query.bind(*value),
            Arg::Time(at) => query.bind(*at),
            Arg::Json(value) => query.bind(
                value
                    .as_ref()
                    .map(|value| sqlx::types::Json(value.as_ref())),
            ),
            Arg::Project(project) => query.bind(project.0),
            Arg::Uuid(id) => query.bind(*id),
            Arg::Bytes(bytes) => query.bind(*bytes),
        })
}

/// A connection of either backend that runs shared statements.
#[async_trait]
pub(crate) trait SqlConn: Send {
    fn backend(&self) -> Backend;
    async fn execute(&mut self, sql: Sql<'_>) -> Result<Done, sqlx::Error>;
    async fn fetch_all(&mut self, sql: Sql<'_>) -> Result<Vec<Row>, sqlx::Error>;
    async fn fetch_optional(&mut self, sql: Sql<'_>) -> Result<Option<Row>, sqlx::Error>;
}

/// A connection inside a write transaction, with what each backend does its
/// own way.
#[async_trait]
pub(crate) trait WriteConn: SqlConn {
    /// The org's billing state, its row created (anchored at `now`) if
    /// missing and locked for the rest of the transaction.
    async fn load_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError>;

    /// The org's billing state as committed, without creating or locking its
    /// row (a read that must not take locks out of the global order).
    async fn read_org(
        &mut self,
        project: ProjectId,
        org_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrgState, StoreError>;

    /// Writes what changed between `before` and `after`; returns the state
    /// as stored (its version bumped if anything changed).
    async fn save_org(
        &mut self,
        project: ProjectId,
        before: &OrgState,
        after: OrgState,
    ) -> Result<OrgState, StoreError>;

    /// Tells other nodes, at commit, the numbers of live messages written.
    async fn notify_live(&mut self, seqs: &[i64]) -> Result<(), StoreError>;

    /// Records a configuration change (and, on PostgreSQL, notifies it).
    async fn record_change(
        &mut self,
        project: ProjectId,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// An open write transaction of either backend.
#[async_trait]
pub(crate) trait TxHandle: Send {
    fn conn(&mut self) -> &mut (dyn WriteConn + 'static);
    fn conn_ref(&self) -> &(dyn WriteConn + 'static);
    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error>;
}

/// A write transaction; dropped without [`Tx::commit`], it rolls back.
pub(crate) struct Tx(Box<dyn TxHandle>);

impl Tx {
    pub(crate) fn new(handle: impl TxHandle + 'static) -> Self {
        Tx(Box::new(handle))
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.0.commit().await
    }
}

impl std::ops::Deref for Tx {
    type Target = dyn WriteConn;

    fn deref(&self) -> &Self::Target {
        self.0.conn_ref()
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.conn()
    }
}

/// A read connection from a backend's pool.
pub(crate) type Reader = Box<dyn SqlConn>;

/// A pooled connection of either backend, as a [`Reader`].
pub(crate) struct Pooled<DB: sqlx::Database>(pub(crate) sqlx::pool::PoolConnection<DB>);

#[async_trait]
impl<DB> SqlConn for Pooled<DB>
where
    DB: sqlx::Database,
    DB::Connection: SqlConn,
{
    fn backend(&self) -> Backend {
        (*self.0).backend()
    }

    async fn execute(&mut self, sql: Sql<'_>) -> Result<Done, sqlx::Error> {
        SqlConn::execute(&mut *self.0, sql).await
    }

    async fn fetch_all(&mut self, sql: Sql<'_>) -> Result<Vec<Row>, sqlx::Error> {
        SqlConn::fetch_all(&mut *self.0, sql).await
    }

    async fn fetch_optional(&mut self, sql: Sql<'_>) -> Result<Option<Row>, sqlx::Error> {
        SqlConn::fetch_optional(&mut *self.0, sql).await
    }
}

/// A write transaction of either backend, as a [`Tx`].
pub(crate) struct Transaction<DB: sqlx::Database>(pub(crate) sqlx::Transaction<'static, DB>);

#[async_trait]
impl<DB> TxHandle for Transaction<DB>
where
    DB: sqlx::Database,
    DB::Connection: WriteConn + 'static,
{
    fn conn(&mut self) -> &mut (dyn WriteConn + 'static) {
        &mut *self.0
    }

    fn conn_ref(&self) -> &(dyn WriteConn + 'static) {
        &*self.0
    }

    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
        self.0.commit().await
    }
}

/// What the shared implementations (projects, configuration, the growth
/// areas) need of a backend's store.
#[async_trait]
pub(crate) trait SqlBackend: Send + Sync {
    const BACKEND: crate::Backend;

    /// Begins a write transaction.
    async fn begin(&self) -> Result<Tx, StoreError>;

    /// A connection for reads.
    async fn reader(&self) -> Result<Reader, StoreError>;
}
