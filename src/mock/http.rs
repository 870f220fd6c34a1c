//! The mock's `POST /v1/responses`: SSE when `stream:true`, else the final response as JSON.
//! Chaining works only through stored responses (there is no connection cache over HTTP).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use super::engine::{self, ApiError, Plan};
use super::script::{Fault, FaultKind};
use super::state::{MockState, SeenRequest, StreamEnd};
use super::ws::{connection_limit, status_error};
use crate::protocol::frames::{sse_error, sse_event};

pub async fn create(
    state: Arc<MockState>,
    account: String,
    headers: HashMap<String, String>,
    body: Bytes,
) -> Response {
    state.with_log(|l| l.http_requests += 1);
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let e = ApiError {
                status: 400,
                kind: "invalid_request_error",
                code: Some("invalid_json".into()),
                message: "The body is not a JSON object.".into(),
                param: None,
            };
            return error_response(&e);
        }
    };
    state.with_log(|l| {
        l.requests.push(SeenRequest {
            conn: 0,
            account: account.clone(),
            body: req.clone(),
            headers,
        })
    });
    let directives = engine::request_directives(&req);
    let fault = state.take_fault(directives.fault.as_ref());
    let plan = match engine::plan(&state, &account, &None, &req) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        sse_response(state, plan, fault)
    } else {
        json_response(&state, plan, fault).await
    }
}

pub fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.http_body())).into_response()
}

/// Non-streaming: the terminal event's `response` object, or the fault's error status.
async fn json_response(state: &MockState, plan: Plan, fault: Option<Fault>) -> Response {
    match fault.map(|f| f.kind) {
        Some(FaultKind::Error { status, code }) => {
            return error_response(&status_error(status, &code))
        }
        Some(FaultKind::Limit) => return error_response(&connection_limit()),
        Some(FaultKind::Stall) | Some(FaultKind::Deaf) => std::future::pending::<()>().await,
        Some(FaultKind::Close(_)) | Some(FaultKind::Eof) => {
            return (StatusCode::BAD_GATEWAY, "mock fault: connection dropped").into_response()
        }
        Some(FaultKind::Slow(d)) => tokio::time::sleep(d * plan.events.len() as u32).await,
        _ => {}
    }
    let last = plan.events.last().cloned().unwrap_or(Value::Null);
    remember(state, &plan);
    log_end(state, &plan, plan.events.len(), "completed");
    match last.get("response") {
        Some(r) => axum::Json(r.clone()).into_response(),
        None => {
            // A replayed `error` fixture: the API answers such errors with a 500 body.
            let code = last
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("server_error");
            error_response(&status_error(500, code))
        }
    }
}

fn remember(state: &MockState, plan: &Plan) {
    let terminal = plan
        .events
        .last()
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str);
    if plan.store
        && matches!(
            terminal,
            Some("response.completed") | Some("response.incomplete")
        )
    {
        state.store(plan.stored.clone());
    }
}

fn log_end(state: &MockState, plan: &Plan, sent: usize, end: &str) {
    let e = StreamEnd {
        conn: 0,
        response_id: plan.response_id.clone(),
        sent,
        planned: plan.events.len(),
        end: end.into(),
    };
    state.with_log(|l| l.stream_ends.push(e));
}

/// Streaming: events as SSE, with the fault acting at its point; a dropped client stops it.
fn sse_response(state: Arc<MockState>, plan: Plan, fault: Option<Fault>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let (sent, end) = pump_sse(&tx, &plan, fault).await;
        if sent == plan.events.len() {
            remember(&state, &plan);
        }
        log_end(&state, &plan, sent, end);
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

type SseTx = mpsc::Sender<Result<Bytes, std::io::Error>>;

async fn pump_sse(tx: &SseTx, plan: &Plan, fault: Option<Fault>) -> (usize, &'static str) {
    let slow = match fault.as_ref().map(|f| &f.kind) {
        Some(FaultKind::Slow(d)) => *d,
        _ => Duration::ZERO,
    };
    for (i, event) in plan.events.iter().enumerate() {
        if let Some(f) = fault.as_ref().filter(|f| f.after == i) {
            match &f.kind {
                FaultKind::Close(_) | FaultKind::Eof => {
                    let _ = tx.send(Err(std::io::Error::other("mock fault"))).await;
                    return (i, "fault");
                }
                FaultKind::Stall | FaultKind::Deaf => {
                    tx.closed().await;
                    return (i, "fault");
                }
                FaultKind::Error { code, .. } => {
                    let data =
                        sse_error(code, &format!("mock fault: {code}"), None, i as u64).to_string();
                    let _ = tx.send(Ok(Bytes::from(sse_event("error", &data)))).await;
                    return (i, "error");
                }
                FaultKind::Limit => {
                    let e = connection_limit();
                    let code = e.code.as_deref().unwrap_or_default();
                    let data = sse_error(code, &e.message, None, i as u64).to_string();
                    let _ = tx.send(Ok(Bytes::from(sse_event("error", &data)))).await;
                    return (i, "error");
                }
                FaultKind::Slow(_) | FaultKind::Forget => {}
            }
        }
        if !slow.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(slow) => {}
                _ = tx.closed() => return (i, "client_closed"),
            }
        }
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let frame = sse_event(kind, &event.to_string());
        if tx.send(Ok(Bytes::from(frame))).await.is_err() {
            return (i, "client_closed");
        }
    }
    (plan.events.len(), "completed")
}
