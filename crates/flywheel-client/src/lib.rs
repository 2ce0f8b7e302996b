//! A small typed client for Flywheel's HTTP API.
//!
//! Its response types are written from the wire contract (the OpenAPI
//! document), not shared with the server, so tests that use this client
//! check what a real client would see.

use chrono::{DateTime, Utc};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with the error envelope.
    #[error("HTTP {status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// A non-success answer without the error envelope (a bug on the server).
    #[error("HTTP {status} without an error envelope: {body}")]
    Unexpected { status: StatusCode, body: String },
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    #[error("cannot decode the response: {0}")]
    Decode(#[from] serde_json::Error),
}

impl Error {
    /// The envelope's status and code, for assertions.
    pub fn status_and_code(&self) -> Option<(u16, &str)> {
        match self {
            Error::Api { status, code, .. } => Some((status.as_u16(), code.as_str())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Publishable,
    Secret,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub status: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Readiness {
    pub status: String,
    pub backend: String,
    pub projects: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CurrentProject {
    pub project_id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub key_id: Uuid,
    pub key_kind: KeyKind,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApiKey {
    pub id: Uuid,
    pub kind: KeyKind,
    pub prefix: String,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: ApiKey,
    pub key: String,
}

#[derive(Debug, Deserialize)]
struct KeyList {
    keys: Vec<ApiKey>,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    error: EnvelopeBody,
}

#[derive(Debug, Deserialize)]
struct EnvelopeBody {
    code: String,
    message: String,
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    key: Option<String>,
}

impl Client {
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base_url: base_url.into().trim_end_matches('/').to_string(),
            key: None,
        }
    }

    /// The same client, authenticating with `key`.
    pub fn with_key(&self, key: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            ..self.clone()
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A request to `path` carrying this client's key, for calls the typed
    /// methods do not cover.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    /// Sends a request and decodes a success body, or the error envelope.
    pub async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, Error> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if status.is_success() {
            return Ok(serde_json::from_slice(&body)?);
        }
        match serde_json::from_slice::<Envelope>(&body) {
            Ok(envelope) => Err(Error::Api {
                status,
                code: envelope.error.code,
                message: envelope.error.message,
            }),
            Err(_) => Err(Error::Unexpected {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    pub async fn healthz(&self) -> Result<Status, Error> {
        self.send(self.request(Method::GET, "/healthz")).await
    }

    pub async fn readyz(&self) -> Result<Readiness, Error> {
        self.send(self.request(Method::GET, "/readyz")).await
    }

    pub async fn openapi(&self) -> Result<serde_json::Value, Error> {
        self.send(self.request(Method::GET, "/openapi.json")).await
    }

    pub async fn metrics(&self) -> Result<String, Error> {
        Ok(self
            .request(Method::GET, "/metrics")
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    pub async fn current_project(&self) -> Result<CurrentProject, Error> {
        self.send(self.request(Method::GET, "/v1/project")).await
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, Error> {
        let list: KeyList = self.send(self.request(Method::GET, "/v1/keys")).await?;
        Ok(list.keys)
    }

    pub async fn create_key(
        &self,
        kind: KeyKind,
        label: Option<&str>,
    ) -> Result<CreatedKey, Error> {
        let body = serde_json::json!({ "kind": kind, "label": label });
        self.send(self.request(Method::POST, "/v1/keys").json(&body))
            .await
    }

    pub async fn revoke_key(&self, key_id: Uuid) -> Result<ApiKey, Error> {
        self.send(self.request(Method::DELETE, &format!("/v1/keys/{key_id}")))
            .await
    }
}
