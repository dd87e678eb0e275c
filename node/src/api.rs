//! The local HTTP API (JSON, under `/v1`), and `/metrics`.
//!
//! Every error is a 4xx/5xx with a JSON body `{"error": {"code": "...", "message": "..."}}`.
//! Writes answer only after the batch is durable. Bad input never reaches the store.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use blazedb_protocol::capability::{Rights, TokenId};
use blazedb_protocol::{limits, FieldValue, OpsBuilder};

use crate::node::{NodeError, NodeHandle};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest `limit` of a list call.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// Default `limit` of a list call.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// An API error: status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::UnknownNamespace(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_namespace", e.to_string())
            }
            NodeError::Invalid(m) => ApiError::bad_request(m),
            NodeError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            NodeError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            NodeError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", e.to_string())
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "body_too_large",
                format!("request body exceeds {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(status, "bad_body", r.body_text())
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router, for embedding in another server or for tests.
pub fn router(node: NodeHandle) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/ns", post(create_namespace))
        .route("/v1/ns/join", post(join_namespace))
        .route("/v1/ns/{ns}/invites", post(invite))
        .route("/v1/ns/{ns}/revocations", post(revoke))
        .route("/v1/ns/{ns}/ops", post(post_ops))
        .route("/v1/ns/{ns}/events", get(events))
        .route("/v1/ns/{ns}/{collection}", get(list))
        .route(
            "/v1/ns/{ns}/{collection}/{key}",
            get(get_record).put(put_record).delete(delete_record),
        )
        .route("/v1/backup", get(backup))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (see README: API)",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

/// Serves the API on `addr` until `shutdown` resolves. Returns the bound address through
/// `bound` as soon as the socket is listening.
pub async fn serve(
    node: NodeHandle,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the API socket.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    shape: &str,
) -> ApiResult<T> {
    let body = body?;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be {shape}: {e}")))
}

async fn create_namespace(State(node): State<NodeHandle>) -> ApiResult<Json<Value>> {
    let ns = node.create_namespace().await?;
    Ok(Json(json!({ "ns": ns })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    to: String,
    rights: String,
    #[serde(default)]
    prefix: Option<String>,
    /// Unix time in milliseconds after which the capability is void.
    #[serde(default)]
    expires_at_ms: Option<u64>,
}

async fn invite(
    State(node): State<NodeHandle>,
    Path(ns): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: InviteBody = parse_json(
        body,
        r#"{"to": "did:key:…", "rights": "read"|"write"|"admin", "prefix"?: "coll/key-prefix", "expires_at_ms"?: n}"#,
    )?;
    let to = blazedb_identity::PublicKey::from_did(&b.to)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rights: Rights = b
        .rights
        .parse()
        .map_err(|e: String| ApiError::bad_request(e))?;
    if let Some(p) = &b.prefix {
        if p.is_empty() || p.len() > limits::MAX_COLLECTION_LEN + 1 + limits::MAX_KEY_LEN {
            return Err(ApiError::bad_request(
                "prefix must be 1..=321 bytes, like \"collection/key-prefix\"",
            ));
        }
    }
    let inv = node
        .invite(&ns, to, rights, b.prefix, b.expires_at_ms)
        .await?;
    Ok(Json(serde_json::to_value(inv).expect("invite serializes")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    token: String,
}

async fn join_namespace(
    State(node): State<NodeHandle>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: JoinBody = parse_json(body, r#"{"token": "blzcap1…"}"#)?;
    let ns = node.join(&b.token).await?;
    Ok(Json(json!({ "ns": ns })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    token_id: String,
}

async fn revoke(
    State(node): State<NodeHandle>,
    Path(ns): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let b: RevokeBody = parse_json(body, r#"{"token_id": "<64 hex digits>"}"#)?;
    let id = TokenId::from_hex(&b.token_id)
        .ok_or_else(|| ApiError::bad_request("token_id must be 64 lowercase hex digits"))?;
    let r = node.revoke(&ns, id).await?;
    Ok(Json(json!({ "ok": true, "batch": r.batch, "seq": r.seq })))
}

async fn status(State(node): State<NodeHandle>) -> ApiResult<Json<Value>> {
    let s = node.status().await?;
    Ok(Json(serde_json::to_value(s).expect("status serializes")))
}

fn parse_object(body: Result<Bytes, BytesRejection>) -> ApiResult<Map<String, Value>> {
    let body = body?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    match value {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!(
            "body must be a JSON object of fields, got {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn put_record(
    State(node): State<NodeHandle>,
    Path((ns, collection, key)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let fields = parse_object(body)?;
    let receipt = node.put(&ns, &collection, &key, fields).await?;
    Ok(Json(
        json!({ "ok": true, "batch": receipt.batch, "seq": receipt.seq }),
    ))
}

async fn get_record(
    State(node): State<NodeHandle>,
    Path((ns, collection, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    // Reads may wait for the materializer (read-your-writes): keep that off the async workers.
    let (n, c, k) = (node.clone(), collection.clone(), key.clone());
    let found = tokio::task::spawn_blocking(move || n.get(&ns, &c, &k))
        .await
        .map_err(|e| read_failed(&node, e))??;
    match found {
        Some(fields) => Ok(Json(
            json!({ "collection": collection, "key": key, "fields": fields }),
        )),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such record",
        )),
    }
}

async fn delete_record(
    State(node): State<NodeHandle>,
    Path((ns, collection, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let receipt = node.delete(&ns, &collection, &key).await?;
    Ok(Json(
        json!({ "ok": true, "batch": receipt.batch, "seq": receipt.seq }),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
}

async fn list(
    State(node): State<NodeHandle>,
    Path((ns, collection)): Path<(String, String)>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..={MAX_LIST_LIMIT}"
        )));
    }
    let n = node.clone();
    let records = tokio::task::spawn_blocking(move || n.list(&ns, &collection, &q.prefix, limit))
        .await
        .map_err(|e| read_failed(&node, e))??;
    let records: Vec<Value> = records
        .into_iter()
        .map(|(key, fields)| json!({ "key": key, "fields": fields }))
        .collect();
    Ok(Json(json!({ "records": records })))
}

/// One op of `POST /v1/ns/{ns}/ops`, read as one flat object borrowing its strings from the
/// body, then checked for the fields its kind takes and added to the call's [`OpsBuilder`]
/// ([`ApiOp::add_to`]): no owned op, no JSON tree of the values. (As an internally tagged
/// enum, serde buffered every op into an intermediate tree of strings and read it a second
/// time.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiOp<'a> {
    op: ApiOpKind,
    #[serde(borrow)]
    collection: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    /// An upsert's fields, as given.
    #[serde(default, borrow)]
    fields: Option<ApiFields<'a>>,
    #[serde(default, borrow)]
    field: Option<Cow<'a, str>>,
    #[serde(default)]
    delta: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ApiOpKind {
    Upsert,
    Delete,
    Add,
}

/// An upsert's fields in the order given (the builder sorts them and refuses a name given
/// twice).
struct ApiFields<'a>(Vec<(Cow<'a, str>, ApiValue<'a>)>);

/// A field value: scalars and strings as they are (strings borrowed from the body unless
/// escaped), arrays and objects as JSON values.
enum ApiValue<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Json(Value),
}

impl ApiValue<'_> {
    fn as_field(&self) -> FieldValue<'_> {
        match self {
            ApiValue::Null => FieldValue::Null,
            ApiValue::Bool(b) => FieldValue::Bool(*b),
            ApiValue::Int(i) => FieldValue::Int(*i),
            ApiValue::Float(f) => FieldValue::Float(*f),
            ApiValue::Str(s) => FieldValue::Str(s),
            ApiValue::Json(v) => FieldValue::Json(v),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ApiFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Fields<'a> {
            type Value = ApiFields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of fields")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(4).min(64));
                while let Some(name) = m.next_key::<Cow<'a, str>>()? {
                    out.push((name, m.next_value::<ApiValue<'a>>()?));
                }
                Ok(ApiFields(out))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ApiValue<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = ApiValue<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ApiValue::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
                Ok(ApiValue::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
                Ok(ApiValue::Int(i))
            }
            fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
                Ok(match i64::try_from(u) {
                    Ok(i) => ApiValue::Int(i),
                    Err(_) => ApiValue::Json(Value::from(u)),
                })
            }
            fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
                Ok(ApiValue::Float(f))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(ApiValue::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(ApiValue::Str(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(ApiValue::Str(Cow::Owned(s)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                let d = serde::de::value::SeqAccessDeserializer::new(a);
                Ok(ApiValue::Json(Value::deserialize(d)?))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                m: M,
            ) -> Result<Self::Value, M::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(m);
                Ok(ApiValue::Json(Value::deserialize(d)?))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl ApiOp<'_> {
    /// Adds the op to `ops` if it has exactly the fields its kind takes and passes the op
    /// rules (`i`: its place, for the error).
    fn add_to(&self, ops: &mut OpsBuilder, i: usize) -> Result<(), String> {
        let (collection, key) = (&*self.collection, &*self.key);
        let added = match (&self.op, &self.fields, &self.field, self.delta) {
            (ApiOpKind::Upsert, Some(fields), None, None) => {
                let fields: Vec<(&str, FieldValue<'_>)> =
                    fields.0.iter().map(|(n, v)| (&**n, v.as_field())).collect();
                ops.upsert(collection, key, &fields)
            }
            (ApiOpKind::Delete, None, None, None) => ops.delete(collection, key),
            (ApiOpKind::Add, None, Some(field), Some(delta)) => {
                ops.add(collection, key, field, delta)
            }
            (ApiOpKind::Upsert, ..) => {
                return Err(format!(
                    "op {i}: an upsert takes \"collection\", \"key\" and \"fields\" (an object)"
                ))
            }
            (ApiOpKind::Delete, ..) => {
                return Err(format!(
                    "op {i}: a delete takes only \"collection\" and \"key\""
                ))
            }
            (ApiOpKind::Add, ..) => {
                return Err(format!(
                    "op {i}: an add takes \"collection\", \"key\", \"field\" and \"delta\""
                ))
            }
        };
        added.map_err(|e| format!("op {i}: {e}"))
    }
}

/// The body of `POST /v1/ns/{ns}/ops`, read straight into an [`OpsBuilder`]: each op is
/// added as soon as it is parsed (no list of parsed ops is built first). An op the builder
/// refuses stops the parse; its error is kept in `refused` (the parse error only says "stop").
struct OpsInto<'b> {
    ops: &'b mut OpsBuilder,
    refused: &'b mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for OpsInto<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OpsInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with \"ops\"")
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<(), M::Error> {
        use serde::de::Error;
        let mut seen = false;
        while let Some(key) = m.next_key::<Cow<'de, str>>()? {
            if key != "ops" || seen {
                return Err(M::Error::custom(format!("unexpected field {key:?}")));
            }
            seen = true;
            m.next_value_seed(OpsSeq {
                ops: &mut *self.ops,
                refused: &mut *self.refused,
            })?;
        }
        match seen {
            true => Ok(()),
            false => Err(M::Error::missing_field("ops")),
        }
    }
}

/// The `ops` list (see [`OpsInto`]).
struct OpsSeq<'b> {
    ops: &'b mut OpsBuilder,
    refused: &'b mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for OpsSeq<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OpsSeq<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of ops")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let mut i = 0;
        while let Some(op) = seq.next_element::<ApiOp<'de>>()? {
            if let Err(why) = op.add_to(self.ops, i) {
                *self.refused = Some(why);
                return Err(A::Error::custom("op refused"));
            }
            i += 1;
        }
        Ok(())
    }
}

async fn post_ops(
    State(node): State<NodeHandle>,
    Path(ns): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let body = body?;
    // The body's UTF-8 is checked once, in one pass: parsing a `str` then skips the check
    // serde_json otherwise makes for each string it reads (~4% of bulk ingest's CPU).
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
    let mut ops = OpsBuilder::with_capacity(text.len() / 120, 96);
    let mut refused = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = serde::de::DeserializeSeed::deserialize(
        OpsInto {
            ops: &mut ops,
            refused: &mut refused,
        },
        &mut de,
    )
    .and_then(|()| de.end());
    if let Some(why) = refused {
        return Err(ApiError::bad_request(why));
    }
    parsed.map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"ops\": [{{\"op\": \"upsert\"|\"delete\"|\"add\", ...}}]}}: {e}"
        ))
    })?;
    let receipt = node.write_built(&ns, ops).await?;
    Ok(Json(
        json!({ "ok": true, "batch": receipt.batch, "seq": receipt.seq, "ops": receipt.ops }),
    ))
}

async fn events(
    State(node): State<NodeHandle>,
    Path(ns): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    if !node.has_namespace(&ns) {
        return Err(NodeError::UnknownNamespace(ns).into());
    }
    let stream = BroadcastStream::new(node.subscribe()).filter_map(move |item| match item {
        Ok(change) if change.ns == ns => Some(Ok(Event::default()
            .event("change")
            .data(serde_json::to_string(&change).expect("change serializes")))),
        Ok(_) => None,
        Err(BroadcastStreamRecvError::Lagged(n)) => Some(Ok(Event::default()
            .event("lagged")
            .data(json!({ "missed": n }).to_string()))),
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Appends one metric in Prometheus text format.
fn metric(out: &mut String, kind: &str, name: &str, help: &str, v: impl std::fmt::Display) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
    ));
}

/// A read on the blocking pool that did not return: redb panics on some damaged pages of
/// the view file. The answer says where to look rather than only the panic's words.
/// The view is marked to be made again at the next start, as when the materializer fails.
fn read_failed(node: &NodeHandle, e: tokio::task::JoinError) -> ApiError {
    let why = match e.try_into_panic() {
        Ok(p) => {
            let why = crate::store::panic_message(p.as_ref());
            node.view_failed(&format!("a read panicked: {why}"));
            format!(
                "reading the store panicked (a damaged page of the view file?): {why}; the \
                 next start makes the view again from the log (`blazedb check` tells more)"
            )
        }
        Err(e) => format!("the read did not finish: {e}"),
    };
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", why)
}

/// Bytes read from the backup file per chunk of the answer.
const BACKUP_CHUNK: usize = 1 << 20;
/// A backup's download that takes no chunk for this long is ended: its copy's disk space
/// and the backup turn it holds are let go.
const BACKUP_STALL: Duration = Duration::from_secs(300);

/// `GET /v1/backup`: a copy of the log, consistent at one point, as a redb file
/// ([`NodeHandle::backup_file`]). Made whole before the answer starts (its length is
/// known, and a failure is a clear error, not a cut stream); the file is already unlinked,
/// so its space is freed when the answer ends, however it ends, and no other backup is made
/// before. A reader that stops reading for [`BACKUP_STALL`] loses the answer.
async fn backup(State(node): State<NodeHandle>) -> ApiResult<Response> {
    let (file, info, busy) = node.backup_file().await?.into_parts();
    // The answer holds `busy` (no other backup is made until it ends) and the file.
    let held = Stalling::new((tokio::fs::File::from_std(file), busy), BACKUP_STALL);
    let body = futures::stream::try_unfold(held, |held| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; BACKUP_CHUNK];
        let n = {
            let mut guard = held.lock().await?;
            guard.0.read(&mut buf).await?
        };
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), held)))
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, info.bytes.to_string()),
            (
                axum::http::HeaderName::from_static("x-blazedb-batches"),
                info.batches.to_string(),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Something an answer's stream holds (a file, a turn) that is let go if the stream is not
/// polled for `stall`: a client that stops reading cannot keep it. A watchdog task looks
/// every fifth of `stall` whether the stream took anything since; it ends with the stream.
struct Stalling<T> {
    held: Arc<tokio::sync::Mutex<Option<T>>>,
    polled: Arc<std::sync::atomic::AtomicU64>,
}

impl<T: Send + 'static> Stalling<T> {
    fn new(value: T, stall: Duration) -> Self {
        let held = Arc::new(tokio::sync::Mutex::new(Some(value)));
        let polled = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (weak, seen) = (Arc::downgrade(&held), polled.clone());
        tokio::spawn(async move {
            let (mut last, mut since) = (0, tokio::time::Instant::now());
            loop {
                tokio::time::sleep(stall / 5).await;
                let Some(held) = weak.upgrade() else {
                    return; // the answer ended
                };
                let now = seen.load(Ordering::Relaxed);
                if now != last {
                    (last, since) = (now, tokio::time::Instant::now());
                } else if since.elapsed() >= stall {
                    held.lock().await.take();
                    return;
                }
            }
        });
        Self { held, polled }
    }

    /// The held value, unless the stream stalled and it was let go.
    async fn lock(&self) -> std::io::Result<tokio::sync::MappedMutexGuard<'_, T>> {
        self.polled.fetch_add(1, Ordering::Relaxed);
        let guard = self.held.lock().await;
        tokio::sync::MutexGuard::try_map(guard, |v| v.as_mut()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the reader took nothing for too long",
            )
        })
    }
}

async fn metrics(State(node): State<NodeHandle>) -> Response {
    let m = node.metrics();
    let n = node.clone();
    let (batches, records) = tokio::task::spawn_blocking(move || n.counts_bounded())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or((0, 0));
    let mut out = String::new();
    metric(
        &mut out,
        "counter",
        "blazedb_local_batches_total",
        "Batches written by this node.",
        m.local_batches.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_local_ops_total",
        "Ops written by this node.",
        m.local_ops.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_pending_dropped_total",
        "Out-of-order batches dropped because the buffer was full (fetched again later).",
        m.pending_dropped.load(Ordering::Relaxed),
    );
    let (flushes, flushed) = node.view_flushes();
    metric(
        &mut out,
        "counter",
        "blazedb_view_flushes_total",
        "Record deltas written into the view file (each one transaction).",
        flushes,
    );
    metric(
        &mut out,
        "counter",
        "blazedb_view_records_flushed_total",
        "Records written into the view file by those flushes.",
        flushed,
    );
    let (runs, folds) = node.view_flush_kinds();
    metric(
        &mut out,
        "counter",
        "blazedb_view_runs_written_total",
        "View flushes that wrote their delta as a sorted run beside the records' table.",
        runs,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_view_runs",
        "Sorted runs held beside the records' table now (a read looks in each whose Bloom filter may hold its key).",
        node.view_runs_held().unwrap_or(0) as u64,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_view_run_filter_bytes",
        "Bytes of the runs' Bloom filters held in memory (10 bits per record in a run).",
        node.run_filter_bytes(),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_view_folds_total",
        "View flushes that folded a slice of the key space (the runs' records there, and the delta's) into the records' table.",
        folds,
    );
    let (paced, stopped) = node.view_paced();
    metric(
        &mut out,
        "counter",
        "blazedb_view_paced_seconds_total",
        "Time the materializer staged no faster than the running view flush goes (writers that outpace the view file wait this).",
        paced.as_secs_f64(),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_view_stopped_seconds_total",
        "Time the materializer waited at its memory bound for a view flush to end (writers wait this too).",
        stopped.as_secs_f64(),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_reads_joined_total",
        "Reads (gets and listings) that joined batches in the log and not yet in the records, instead of waiting for the records.",
        node.reads_joined(),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_dials_total",
        "Outgoing dials started (bootstrap peers and their redials, mDNS finds, dial commands).",
        m.dials.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_remote_batches_total",
        "Batches stored from peers.",
        m.remote_batches.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_rejected_total",
        "Invalid batches or messages from peers.",
        m.rejected.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_peers_dropped_total",
        "Peers disconnected for misbehaviour.",
        m.peers_dropped.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_commits_total",
        "Durable store transactions.",
        m.commits.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_commit_groups_max",
        "Most groups (local flushes, received-batch groups) one log commit has covered.",
        m.commit_groups_max.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_commits_ahead_total",
        "Log commits of light groups (live writes) taken ahead of heavier groups queued before them (catch-up answers) that share no author with them.",
        m.commits_ahead.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_commits_split_total",
        "Log commits that took only part of a group larger than one transaction holds (4 MiB of batches).",
        m.commits_split.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_duplicate_batches_total",
        "Batches received that were already held.",
        m.duplicates.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_pushes_dropped_total",
        "Pushes to slow readers dropped (they catch up by fetching).",
        m.pushes_dropped.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_serves_queued_total",
        "Fetches from peers that waited for their bulk answers in flight (backpressure).",
        m.serves_queued.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_serves_dropped_total",
        "Fetches from peers dropped because their bulk queue was full.",
        m.serves_dropped.load(Ordering::Relaxed),
    );
    for (name, help, v) in [
        (
            "blazedb_dicts_trained_total",
            "zstd dictionaries trained from this node's small batches.",
            &m.dicts_trained,
        ),
        (
            "blazedb_dict_batches_sealed_total",
            "Local batches sealed with a dictionary.",
            &m.dict_batches_sealed,
        ),
        (
            "blazedb_fast_compressed_batches_total",
            "Local batches whose large payload was compressed below the strong zstd level (the fast or the fastest: the matches the stronger levels find gained too little on this data).",
            &m.fast_compressed_sealed,
        ),
        (
            "blazedb_writer_compressed_batches_total",
            "Local batches sealed with the ops frame their writer compressed ahead (on the writer's task, in parallel with other writers).",
            &m.writer_compressed_sealed,
        ),
        (
            "blazedb_dict_batches_stored_total",
            "Batches stored (local and remote) that use a dictionary.",
            &m.dict_batches_stored,
        ),
        (
            "blazedb_dicts_received_total",
            "Dictionaries received from peers.",
            &m.dicts_received,
        ),
        (
            "blazedb_dict_waits_dropped_total",
            "Batches that waited for a dictionary and were dropped (fetched again later).",
            &m.dict_waits_dropped,
        ),
    ] {
        metric(&mut out, "counter", name, help, v.load(Ordering::Relaxed));
    }
    metric(
        &mut out,
        "counter",
        "blazedb_ineffective_batches_total",
        "Batches stored whose capability was revoked before they were written.",
        m.ineffective.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_log_damaged_total",
        "Fetch answers cut short before a batch of this node's log found damaged.",
        m.log_damaged.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_scrub_batches_total",
        "Stored batches the log's background scrub re-verified sound.",
        m.scrub_batches.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_scrub_damaged_total",
        "Damaged batches the log's background scrub found (the first of each chain, per pass).",
        m.scrub_damaged.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_scrub_passes_total",
        "Passes of the log's background scrub finished.",
        m.scrub_passes.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_sync_dropped_total",
        "Sync messages dropped because the peer had the maximum unanswered (sent again later).",
        m.sync_dropped.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_gossip_dropped_total",
        "Gossip publishes refused because every subscriber's send queue was full.",
        m.gossip_dropped.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_batches_sealed_total",
        "Batches sealed from local writes (coalesced writes share one).",
        m.batches_sealed.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_ops_sealed_total",
        "Ops in the batches sealed from local writes (after op merging).",
        m.ops_sealed.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "counter",
        "blazedb_writes_total",
        "Local write calls acknowledged (durable).",
        m.writes_acked.load(Ordering::Relaxed),
    );
    let q = node.queues();
    metric(
        &mut out,
        "gauge",
        "blazedb_command_queue_depth",
        "Commands queued for the node's actor (bound: 256).",
        q.commands,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_command_queue_depth_max",
        "Highest command queue depth seen.",
        q.commands_max,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_materializer_queue_depth",
        "Jobs queued for the materializer (bound: 64, plus the one being picked up).",
        q.materializer_jobs,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_materializer_queue_depth_max",
        "Highest materializer queue depth seen.",
        q.materializer_jobs_max,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_sync_inflight_max",
        "Highest number of unanswered sync requests to one peer seen (bound: 32).",
        q.sync_inflight_max,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_commit_queue_depth_max",
        "Highest depth of the log committer's queue seen (bound: 2, plus the one being taken).",
        q.commit_queue_max,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_verify_queue_depth_max",
        "Highest depth of the fetch-answer verifier's queue seen (bound: 4, plus the one being taken).",
        q.verify_queue_max,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_batch_linger_us",
        "Current adaptive flush delay of local writes, in microseconds.",
        m.batch_linger_us.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_stored_batches",
        "Batches in the store.",
        batches,
    );
    metric(
        &mut out,
        "gauge",
        "blazedb_stored_records",
        "Records in the store (counted again once the last count is ten times its own cost old).",
        records,
    );
    out.push_str(&node.gossip_metrics_text());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Sets its flag when dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// A stream polled in time keeps what it holds, however long it runs; left alone past
    /// the stall, what it holds is dropped and the next poll is an error. (Virtual time:
    /// the clock only moves when every task waits.)
    #[tokio::test(start_paused = true)]
    async fn what_a_stalled_answer_holds_is_let_go() {
        let dropped = Arc::new(AtomicBool::new(false));
        let stall = Duration::from_secs(300);
        let held = Stalling::new(Dropped(dropped.clone()), stall);
        for _ in 0..20 {
            tokio::time::sleep(stall / 2).await;
            assert!(held.lock().await.is_ok());
        }
        assert!(!dropped.load(Ordering::Relaxed));
        tokio::time::sleep(stall * 2).await;
        assert!(dropped.load(Ordering::Relaxed));
        let late = held.lock().await.err().expect("let go");
        assert_eq!(late.kind(), std::io::ErrorKind::TimedOut);
    }
}
