//! Throwaway stores for tests: a temporary SQLite file, or a uniquely named
//! PostgreSQL database that is dropped when the handle is.
//!
//! PostgreSQL is found through `FLYWHEEL_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). When it cannot be reached
//! the test fails, loudly: the PostgreSQL half of the suite is never skipped.
//! `scripts/test` starts a throwaway cluster when no server is running.

use std::sync::Arc;

use sqlx::Connection;

use crate::{Backend, Store, StoreOptions};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The administrative URL tests create their databases through.
pub fn postgres_admin_url() -> String {
    std::env::var("FLYWHEEL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// A database that exists for one test. Keep it alive as long as the store.
#[derive(Debug)]
pub enum TestDatabase {
    Sqlite {
        dir: tempfile::TempDir,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => TestDatabase::Sqlite {
                dir: tempfile::tempdir().expect("create a temporary directory"),
            },
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let name = format!("flywheel_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is not reachable at {} ({e}).\n\
                         The PostgreSQL tests are part of the suite and are not skipped.\n\
                         Run `scripts/test`, which starts a throwaway cluster when none is running \
                         (it needs the PostgreSQL server binaries: `apt-get install postgresql`), \
                         or point FLYWHEEL_TEST_POSTGRES_URL at a server where this user may CREATE DATABASE.",
                        crate::redact_url(&admin_url)
                    )
                });
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut admin)
                    .await
                    .expect("CREATE DATABASE for a test");
                let url = with_database(&admin_url, &name);
                TestDatabase::Postgres {
                    admin_url,
                    name,
                    url,
                }
            }
        }
    }

    /// Options that open this database (the data directory for SQLite).
    pub fn options(&self) -> StoreOptions {
        match self {
            TestDatabase::Sqlite { dir } => StoreOptions::embedded(dir.path().join("data")),
            TestDatabase::Postgres { url, .. } => {
                let mut options = StoreOptions::embedded("unused");
                options.database_url = Some(url.clone());
                options.max_connections = 8;
                options
            }
        }
    }

    /// The `--database-url`/`--data-dir` pair a child process would use.
    pub fn database_url(&self) -> Option<&str> {
        match self {
            TestDatabase::Sqlite { .. } => None,
            TestDatabase::Postgres { url, .. } => Some(url),
        }
    }

    pub async fn open(&self) -> Arc<dyn Store> {
        crate::open(&self.options())
            .await
            .expect("open the test store")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let TestDatabase::Postgres {
            admin_url, name, ..
        } = self
        else {
            return;
        };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        // Drop may run inside a runtime, where blocking on another future is
        // not allowed: do the DROP on a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("warning: could not drop a test database: {error}");
        }
    }
}

/// Replaces the database name (the path) of a PostgreSQL URL.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Instantiates each listed `async fn name(backend: Backend)` as two tests,
/// `sqlite::name` and `postgres::name`: write a test once, run it on every
/// backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
              async fn $name() { super::$name($crate::Backend::Sqlite).await; })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
              async fn $name() { super::$name($crate::Backend::Postgres).await; })*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_swaps_only_the_path() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres", "x"),
            "postgres://u@h:5/x"
        );
        assert_eq!(with_database("postgres://u@h:5", "x"), "postgres://u@h:5/x");
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
