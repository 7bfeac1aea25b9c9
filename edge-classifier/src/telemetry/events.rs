//! `/events`: `edge-classifier monitor --json` over HTTP, for remote use. Each request runs a
//! monitor of the daemon's instance (a slot of its own) on a thread and streams its events as
//! JSON lines (`application/x-ndjson`); the last line is `{"summary": …}` with what was shown
//! and missed. The selection is the query string, as the command line has it: `reason`,
//! `rule` and `iface` repeatable, `verdict`, `filter` (pcap-filter), `count`, `duration`
//! (seconds), `rate`. A client that goes away ends the monitor within a quarter second.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    extract::{RawQuery, State},
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use edge_classifier_common::monitor::MONITOR_DEFAULT_RATE;

use crate::{
    instance::Instance,
    monitor::{Run, Selection, Verdicts},
};

/// The query string as a monitoring run.
pub fn parse_query(query: &str) -> Result<Run, String> {
    let mut run = Run {
        selection: Selection {
            reasons: Vec::new(),
            rules: Vec::new(),
            ifaces: Vec::new(),
            verdicts: Verdicts::Drop,
            rate: MONITOR_DEFAULT_RATE,
        },
        filter: String::new(),
        count: None,
        duration: None,
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.into_owned();
        let number = |what: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{what}: `{v}` is not a non-negative number"))
        };
        match &*k {
            "reason" => run.selection.reasons.push(v),
            "rule" => run.selection.rules.push(v),
            "iface" => run.selection.ifaces.push(v),
            "verdict" => {
                run.selection.verdicts = match v.as_str() {
                    "drop" => Verdicts::Drop,
                    "pass" => Verdicts::Pass,
                    "all" => Verdicts::All,
                    _ => return Err(format!("verdict: `{v}`: expected drop, pass or all")),
                }
            }
            "filter" => run.filter = v,
            "count" => run.count = Some(number("count")? as u64),
            "duration" => run.duration = Some(Duration::from_secs_f64(number("duration")?)),
            "rate" => {
                run.selection.rate = number("rate")? as u32;
                if run.selection.rate == 0 {
                    return Err("rate: at least 1 event a second".to_string());
                }
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{k}`: expected reason, rule, iface, verdict, filter, count, duration or rate"
                ));
            }
        }
    }
    Ok(run)
}

pub async fn stream(State(instance): State<Instance>, RawQuery(query): RawQuery) -> Response {
    let run = match parse_query(query.as_deref().unwrap_or("")) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        let closed = tx.clone();
        let result = crate::monitor::run(
            &instance,
            &run,
            &|| closed.is_closed(),
            &mut |_| {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
            },
            &mut |ev| {
                tx.blocking_send(format!("{}\n", ev.json()))
                    .map_err(|_| std::io::Error::other("the client went away"))
            },
        );
        match result {
            Ok(outcome) => {
                let line = serde_json::json!({ "summary": outcome });
                let _ = tx.blocking_send(format!("{line}\n"));
            }
            Err(e) => match ready.take() {
                // Not attached: the request fails with the reason.
                Some(r) => {
                    let _ = r.send(Err(e.to_string()));
                }
                None => {
                    let line = serde_json::json!({ "error": e.to_string() });
                    let _ = tx.blocking_send(format!("{line}\n"));
                }
            },
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(_) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "the monitor ended\n").into_response();
        }
    }
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    (
        [(CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_the_command_line() {
        let r = parse_query(
            "reason=no_rule&reason=not_established&iface=ext0&verdict=all&filter=tcp+port+5061&count=5&duration=2.5&rate=100",
        )
        .unwrap();
        assert_eq!(r.selection.reasons, ["no_rule", "not_established"]);
        assert_eq!(r.selection.ifaces, ["ext0"]);
        assert_eq!(r.selection.verdicts, Verdicts::All);
        assert_eq!(r.filter, "tcp port 5061");
        assert_eq!(r.count, Some(5));
        assert_eq!(r.duration, Some(Duration::from_millis(2500)));
        assert_eq!(r.selection.rate, 100);
        assert!(
            parse_query("verdict=maybe")
                .unwrap_err()
                .contains("verdict")
        );
        assert!(parse_query("count=-1").unwrap_err().contains("count"));
        assert!(
            parse_query("colour=red")
                .unwrap_err()
                .contains("unknown parameter")
        );
    }
}
