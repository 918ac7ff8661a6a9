//! Request metrics and the request log: every request counted and timed under its route
//! template, requests in flight, and one log line per server error (`warn` for shed requests
//! and timeouts, `error` otherwise). Labels come from closed sets: the router's own templates,
//! a fixed list of methods, and the status code.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};
use shared::metrics::{
    Counter, Family, Gauge, Histogram, Label, LabelSet, LabelValue, Reason, Registry,
    LATENCY_BUCKETS,
};
use tokio::time::Instant;

use crate::{
    events::EventMetrics,
    logs::{LogLine, RequestFailed},
    problem::Failure,
};

/// The route label of requests that matched no route.
const UNMATCHED: &str = "unmatched";
/// The route label of requests shed before routing.
const UNROUTED: &str = "unrouted";

/// The route template a request matched, carried out of the router on its response.
#[derive(Debug, Clone)]
pub struct RouteTemplate(pub MatchedPath);

/// Middleware inside the router: notes on the response which route template matched.
pub async fn remember_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(m) = matched {
        response.extensions_mut().insert(RouteTemplate(m));
    }
    response
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    route: LabelValue,
    method: &'static str,
    status: u16,
}

impl LabelSet for RequestLabels {
    fn labels(&self) -> Vec<Label> {
        vec![
            ("route", self.route.clone()),
            ("method", LabelValue::Name(self.method)),
            ("status", LabelValue::Number(self.status)),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteLabel(LabelValue);

impl LabelSet for RouteLabel {
    fn labels(&self) -> Vec<Label> {
        vec![("route", self.0.clone())]
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram>,
    in_flight: Gauge,
    pub(crate) shed: Family<Reason, Counter>,
    /// Every route template the router serves, as label values.
    routes: HashMap<String, Arc<str>>,
}

impl Metrics {
    /// Metrics for a router serving `routes` (its templates, e.g. `/api/labs`).
    pub fn new(routes: impl IntoIterator<Item = String>, events: &EventMetrics) -> Self {
        let mut r = Registry::default();
        events.register(&mut r);
        Self {
            requests: r.counters("http_requests", "HTTP requests by route, method and status"),
            latency: r.histograms(
                "http_request_duration_seconds",
                "HTTP request latency by route",
                LATENCY_BUCKETS,
            ),
            in_flight: r.gauge(
                "http_requests_in_flight",
                "HTTP requests being answered now",
            ),
            shed: r.counters(
                "http_requests_shed",
                "Requests given up to protect the service: overloaded (api.max_concurrent_requests in flight), timeout (past api.request_timeout), streams_full (api.events.max_streams open)",
            ),
            routes: routes
                .into_iter()
                .map(|t| (t.clone(), Arc::from(t)))
                .collect(),
            registry: Arc::new(r),
        }
    }

    /// The route label of a response: the template it matched (from the set known at start),
    /// `unmatched`, or `unrouted` when it was shed before routing.
    fn route(&self, response: &Response) -> LabelValue {
        let shed = response
            .extensions()
            .get::<Failure>()
            .is_some_and(|f| f.kind == "overloaded");
        match response.extensions().get::<RouteTemplate>() {
            Some(RouteTemplate(m)) => self
                .routes
                .get(m.as_str())
                .map_or(LabelValue::Name(UNMATCHED), |t| {
                    LabelValue::Known(t.clone())
                }),
            None if shed => LabelValue::Name(UNROUTED),
            None => LabelValue::Name(UNMATCHED),
        }
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> f64 {
        self.in_flight.get()
    }
}

/// Why a request was shed, for the problem kinds that mean it was.
fn shed_reason(kind: &str) -> Option<&'static str> {
    match kind {
        "overloaded" => Some("overloaded"),
        "timeout" => Some("timeout"),
        "streams-full" => Some("streams_full"),
        _ => None,
    }
}

/// The method label: the methods HTTP defines; anything else is `other`.
fn method(m: &Method) -> &'static str {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(k, _)| k == m)
        .map_or("other", |(_, name)| name)
}

/// Leaves the in-flight count right however the request ends (a client that goes away
/// drops the request's future).
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.add(-1.0);
    }
}

/// Middleware: counts and times every request under its route template and logs each server
/// error once, with the details the client never sees.
pub async fn observe(State(m): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let method = method(request.method());
    m.in_flight.add(1.0);
    let _in_flight = InFlight(m.in_flight.clone());
    let started = Instant::now();
    let response = next.run(request).await;
    let took = started.elapsed();
    let status = response.status();
    let route = m.route(&response);
    m.latency
        .get(&RouteLabel(route.clone()))
        .observe(took.as_secs_f64());
    m.requests
        .get(&RequestLabels {
            route: route.clone(),
            method,
            status: status.as_u16(),
        })
        .inc();
    if status.is_server_error() {
        let failure = response.extensions().get::<Failure>();
        let kind = failure.map_or("unknown", |f| f.kind);
        RequestFailed {
            status,
            kind,
            route: &route,
            method,
            took,
            detail: failure.map_or("", |f| f.detail.as_str()),
            shed: shed_reason(kind),
            metrics: &m,
        }
        .emit();
    }
    response
}
