//! Per-request metrics: what every call came to, counted where it ends ([`Metrics::record`],
//! reached from the pipeline's one record step).
//!
//! Names follow the OpenTelemetry GenAI conventions as Prometheus spells them (dots to `_`,
//! seconds as `_seconds`, the conventions' bucket boundaries) beside Meridian's own
//! `meridian_*`. Labels stay bounded: a model is named only if the node serves it, tenants and
//! features only up to a configured number each (the rest are one `other` series), and no user,
//! key or request id is ever a label.
//!
//! prometheus-client keeps a counter as one atomic and a histogram behind one short mutex;
//! each record looks its series up by a label set of shared strings (no allocation once the
//! series exists).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use meridian_policy::limit::LimitKind;
use meridian_proto::openai::Api;
use meridian_proto::{ApiError, ErrorKind};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Which edge a request came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Edge {
    Http,
    /// Also reads `grpc-timeout`: with `x-meridian-deadline-ms`, the earlier deadline holds.
    Grpc,
}

impl Edge {
    pub fn as_str(self) -> &'static str {
        match self {
            Edge::Http => "http",
            Edge::Grpc => "grpc",
        }
    }
}

impl EncodeLabelValue for Edge {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The GenAI operation a request is (`gen_ai.operation.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Operation(pub Api);

impl EncodeLabelValue for Operation {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.operation(), encoder)
    }
}

/// Bucket boundaries of the GenAI conventions: durations (s), time to first token (s), time
/// per output token (s), token counts.
const DURATION: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const FIRST_TOKEN: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
const PER_TOKEN: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
const TOKENS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// A label value shared between series (cloning it is a reference count, not a copy).
type Text = Arc<str>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    edge: Edge,
    gen_ai_operation_name: Operation,
    gen_ai_request_model: Text,
    provider: Text,
    /// `ok`, `cached`, `cancelled`, or the error's code.
    code: Text,
    /// `2xx`, `4xx` or `5xx`: the class of the status the request's answer had.
    status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QuotaLabels {
    /// `admitted`, `limited` (a 429) or `unavailable` (no slice could be had: no quorum).
    result: &'static str,
    /// The limit that refused (`requests_per_minute`, …); `none` when admitted.
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabels {
    gen_ai_operation_name: Operation,
    gen_ai_request_model: Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenUsageLabels {
    gen_ai_operation_name: Operation,
    gen_ai_provider_name: Text,
    gen_ai_request_model: Text,
    /// `input` or `output`.
    gen_ai_token_type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderLabels {
    provider: Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SpendLabels {
    model: Text,
    provider: Text,
    tenant: Text,
    feature: Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    model: Text,
    provider: Text,
    tenant: Text,
    feature: Text,
    /// `input`, `output` or `cached_input` (a part of `input`).
    r#type: &'static str,
}

/// Up to `cap` distinct values name their own series; the rest share `other`.
#[derive(Debug)]
struct Capped {
    cap: usize,
    seen: Mutex<HashSet<Text>>,
    other: Text,
    none: Text,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: Mutex::new(HashSet::new()),
            other: "other".into(),
            none: "".into(),
        }
    }

    fn label(&self, value: Option<&str>) -> Text {
        let Some(value) = value else {
            return Arc::clone(&self.none);
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = seen.get(value) {
            return Arc::clone(known);
        }
        if seen.len() >= self.cap {
            return Arc::clone(&self.other);
        }
        let text: Text = value.into();
        seen.insert(Arc::clone(&text));
        text
    }
}

/// How many tenants and features name their own series (the rest are `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelCaps {
    pub tenants: usize,
    pub features: usize,
}

impl Default for LabelCaps {
    fn default() -> Self {
        Self {
            tenants: 1_000,
            features: 100,
        }
    }
}

/// Tokens a call used, as its provider reported them (or as far as a stream got).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    pub output: u64,
    /// Prompt tokens served from the provider's prompt cache (a part of `input`).
    pub cached_input: u64,
}

/// Everything [`Metrics::record`] counts of one request.
#[derive(Debug, Clone)]
pub struct CallRecord<'a> {
    pub edge: Edge,
    pub operation: Operation,
    /// The model asked for, as a label: the name if this node serves it, `other` if not.
    pub model: &'a Text,
    /// The provider that answered (or was tried last); `None` if none was.
    pub provider: Option<&'a Text>,
    pub tenant: Option<&'a str>,
    pub feature: Option<&'a str>,
    /// `ok`, `cached`, `cancelled`, or the error's code.
    pub code: &'a str,
    /// `2xx`, `4xx` or `5xx`.
    pub status_class: &'static str,
    /// From the request's arrival to its last byte (or its error).
    pub duration: Duration,
    /// From the request's arrival to the first content sent (streams).
    pub first_token: Option<Duration>,
    /// Waiting for a slot at the provider that answered.
    pub queue_wait: Option<Duration>,
    /// From the call to that provider to its end.
    pub upstream: Option<Duration>,
    pub tokens: Option<Tokens>,
    pub cost_micro_usd: u64,
}

/// The series one kind of request lands in, found once and kept: a request whose edge,
/// model, provider, tenant, feature and outcome were seen before costs one lookup here, not one
/// per series.
#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
    first_token: Histogram,
    per_output_token: Histogram,
    /// Made once a request of this kind reached a provider.
    provider: OnceLock<ProviderSeries>,
    /// Made once a request of this kind reported usage (no usage, no token series).
    spend: OnceLock<SpendSeries>,
}

#[derive(Debug)]
struct ProviderSeries {
    queue_wait: Histogram,
    upstream: Histogram,
}

#[derive(Debug)]
struct SpendSeries {
    input_usage: Histogram,
    output_usage: Histogram,
    input: Counter,
    output: Counter,
    cached_input: Counter,
    cost: Counter,
}

/// What picks a request's [`Series`], as the cache keeps it.
#[derive(Debug, PartialEq, Eq)]
struct SeriesKey {
    edge: Edge,
    model: Box<str>,
    provider: Box<str>,
    tenant: Option<Box<str>>,
    feature: Option<Box<str>>,
    code: Box<str>,
    status_class: &'static str,
}

/// The same, borrowed from a request (no copy to look it up).
#[derive(Debug, Clone, Copy)]
struct SeriesOf<'a> {
    edge: Edge,
    model: &'a str,
    provider: &'a str,
    tenant: Option<&'a str>,
    feature: Option<&'a str>,
    code: &'a str,
    status_class: &'static str,
}

impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        SeriesOf {
            edge: self.edge,
            model: &self.model,
            provider: &self.provider,
            tenant: self.tenant.as_deref(),
            feature: self.feature.as_deref(),
            code: &self.code,
            status_class: self.status_class,
        }
        .hash(h);
    }
}

impl std::hash::Hash for SeriesOf<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (
            self.edge,
            self.model,
            self.provider,
            self.tenant,
            self.feature,
            self.code,
            self.status_class,
        )
            .hash(h);
    }
}

impl hashbrown::Equivalent<SeriesKey> for SeriesOf<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.edge == key.edge
            && self.model == &*key.model
            && self.provider == &*key.provider
            && self.tenant == key.tenant.as_deref()
            && self.feature == key.feature.as_deref()
            && self.code == &*key.code
            && self.status_class == key.status_class
    }
}

impl From<SeriesOf<'_>> for SeriesKey {
    fn from(s: SeriesOf<'_>) -> Self {
        Self {
            edge: s.edge,
            model: s.model.into(),
            provider: s.provider.into(),
            tenant: s.tenant.map(Into::into),
            feature: s.feature.map(Into::into),
            code: s.code.into(),
            status_class: s.status_class,
        }
    }
}

/// Kinds of request whose series are kept found; past it, a new kind looks its series up
/// each time (a client can name any feature).
const KEPT_SERIES: usize = 4_096;

/// The request metrics' series; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<ModelLabels, Histogram>,
    first_token: Family<ModelLabels, Histogram>,
    per_output_token: Family<ModelLabels, Histogram>,
    token_usage: Family<TokenUsageLabels, Histogram>,
    queue_wait: Family<ProviderLabels, Histogram>,
    upstream: Family<ProviderLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<SpendLabels, Counter>,
    quota: Family<QuotaLabels, Counter>,
    /// `quota`'s admitted series, found once (it is counted on every admission).
    admitted: Counter,
    tenants: Arc<Capped>,
    features: Arc<Capped>,
    none: Text,
    found: Arc<std::sync::RwLock<hashbrown::HashMap<SeriesKey, Arc<Series>>>>,
}

fn histograms<S: Clone + Eq + std::hash::Hash>(make: fn() -> Histogram) -> Family<S, Histogram> {
    Family::new_with_constructor(make)
}

impl Metrics {
    pub fn new(caps: LabelCaps) -> Self {
        let quota: Family<QuotaLabels, Counter> = Family::default();
        let admitted = quota.get_or_create_owned(&QuotaLabels {
            result: "admitted",
            limit: "none",
        });
        Self {
            quota,
            admitted,
            requests: Family::default(),
            duration: histograms(|| Histogram::new(DURATION)),
            first_token: histograms(|| Histogram::new(FIRST_TOKEN)),
            per_output_token: histograms(|| Histogram::new(PER_TOKEN)),
            token_usage: histograms(|| Histogram::new(TOKENS)),
            queue_wait: histograms(|| Histogram::new(DURATION)),
            upstream: histograms(|| Histogram::new(DURATION)),
            tokens: Family::default(),
            cost: Family::default(),
            tenants: Arc::new(Capped::new(caps.tenants)),
            features: Arc::new(Capped::new(caps.features)),
            none: "none".into(),
            found: Arc::default(),
        }
    }

    /// Adds every series to `registry` (a node's `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meridian_requests",
            "Inference requests by edge, model, provider, outcome code (ok, cached, cancelled, or the error's code) and status class",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_request_duration",
            "From a request's arrival to its last byte",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "From a streamed request's arrival to its first content sent",
            Unit::Seconds,
            self.first_token.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_per_output_token",
            "After the first token, the time per output token of a streamed request",
            Unit::Seconds,
            self.per_output_token.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens per call, by type (input includes cached input)",
            self.token_usage.clone(),
        );
        registry.register_with_unit(
            "meridian_queue_wait",
            "Waiting for a slot at the provider that answered",
            Unit::Seconds,
            self.queue_wait.clone(),
        );
        registry.register_with_unit(
            "meridian_upstream_duration",
            "From the call to the provider that answered to its end",
            Unit::Seconds,
            self.upstream.clone(),
        );
        registry.register(
            "meridian_tokens",
            "Tokens by model, provider, tenant, feature and type (input, output, cached_input: a part of input)",
            self.tokens.clone(),
        );
        registry.register(
            "meridian_quota_decisions",
            "Admission decisions of requests under limits: admitted, limited (429, by the limit that refused) or unavailable (no quota slice could be had)",
            self.quota.clone(),
        );
        registry.register(
            "meridian_cost_micro_usd",
            "Cost of calls in millionths of a US dollar, by model, provider, tenant and feature",
            self.cost.clone(),
        );
    }

    /// Counts an admission's outcome for an authenticated caller: admitted, refused by a limit,
    /// or refused for want of a quota slice. (With authentication off nothing is admitted, and
    /// a refusal for another reason is not counted here.)
    pub fn quota_decision<T>(&self, admitted: &Result<Option<T>, ApiError>) {
        match admitted {
            Ok(Some(_)) => {
                self.admitted.inc();
            }
            Ok(None) => {}
            Err(e) => {
                let limit = LimitKind::ALL
                    .into_iter()
                    .find(|k| e.code.as_deref() == Some(k.code()));
                let labels = match (e.kind, limit) {
                    (ErrorKind::RateLimited, Some(k)) => QuotaLabels {
                        result: "limited",
                        limit: k.code(),
                    },
                    (_, _) if e.code.as_deref() == Some("quota_unavailable") => QuotaLabels {
                        result: "unavailable",
                        limit: "none",
                    },
                    _ => return,
                };
                self.quota.get_or_create(&labels).inc();
            }
        }
    }

    /// Counts one request, once.
    pub fn record(&self, r: &CallRecord<'_>) {
        let of = SeriesOf {
            edge: r.edge,
            model: r.model,
            provider: r.provider.map_or(&*self.none, |p| &**p),
            tenant: r.tenant,
            feature: r.feature,
            code: r.code,
            status_class: r.status_class,
        };
        let found = self
            .found
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&of)
            .cloned();
        let series = match found {
            Some(s) => s,
            None => self.find(of, r),
        };
        series.requests.inc();
        series.duration.observe(r.duration.as_secs_f64());
        if let Some(first) = r.first_token {
            series.first_token.observe(first.as_secs_f64());
            if let Some(t) = r.tokens.filter(|t| t.output > 1) {
                let after = r.duration.saturating_sub(first).as_secs_f64();
                series
                    .per_output_token
                    .observe(after / (t.output - 1) as f64);
            }
        }
        if let Some(provider) = r.provider {
            let at = series.provider.get_or_init(|| {
                let at = ProviderLabels {
                    provider: Arc::clone(provider),
                };
                ProviderSeries {
                    queue_wait: self.queue_wait.get_or_create_owned(&at),
                    upstream: self.upstream.get_or_create_owned(&at),
                }
            });
            if let Some(wait) = r.queue_wait {
                at.queue_wait.observe(wait.as_secs_f64());
            }
            if let Some(took) = r.upstream {
                at.upstream.observe(took.as_secs_f64());
            }
        }
        let Some(tokens) = r.tokens else { return };
        let spend = series.spend.get_or_init(|| self.spend_series(r));
        spend.input_usage.observe(tokens.input as f64);
        spend.output_usage.observe(tokens.output as f64);
        spend.input.inc_by(tokens.input);
        spend.output.inc_by(tokens.output);
        spend.cached_input.inc_by(tokens.cached_input);
        spend.cost.inc_by(r.cost_micro_usd);
    }

    fn spend_series(&self, r: &CallRecord<'_>) -> SpendSeries {
        let provider = r.provider.unwrap_or(&self.none);
        let usage = |kind| TokenUsageLabels {
            gen_ai_operation_name: r.operation,
            gen_ai_provider_name: Arc::clone(provider),
            gen_ai_request_model: Arc::clone(r.model),
            gen_ai_token_type: kind,
        };
        let spend = SpendLabels {
            model: Arc::clone(r.model),
            provider: Arc::clone(provider),
            tenant: self.tenants.label(r.tenant),
            feature: self.features.label(r.feature),
        };
        let tokens = |kind| TokenLabels {
            model: Arc::clone(&spend.model),
            provider: Arc::clone(&spend.provider),
            tenant: Arc::clone(&spend.tenant),
            feature: Arc::clone(&spend.feature),
            r#type: kind,
        };
        SpendSeries {
            input_usage: self.token_usage.get_or_create_owned(&usage("input")),
            output_usage: self.token_usage.get_or_create_owned(&usage("output")),
            input: self.tokens.get_or_create_owned(&tokens("input")),
            output: self.tokens.get_or_create_owned(&tokens("output")),
            cached_input: self.tokens.get_or_create_owned(&tokens("cached_input")),
            cost: self.cost.get_or_create_owned(&spend),
        }
    }

    /// Looks up (creating them if new) the series of one kind of request, and keeps them.
    fn find(&self, of: SeriesOf<'_>, r: &CallRecord<'_>) -> Arc<Series> {
        let provider = r.provider.unwrap_or(&self.none);
        let model = ModelLabels {
            gen_ai_operation_name: r.operation,
            gen_ai_request_model: Arc::clone(r.model),
        };
        let series = Arc::new(Series {
            requests: self.requests.get_or_create_owned(&RequestLabels {
                edge: r.edge,
                gen_ai_operation_name: r.operation,
                gen_ai_request_model: Arc::clone(r.model),
                provider: Arc::clone(provider),
                code: r.code.into(),
                status_class: r.status_class,
            }),
            duration: self.duration.get_or_create_owned(&model),
            first_token: self.first_token.get_or_create_owned(&model),
            per_output_token: self.per_output_token.get_or_create_owned(&model),
            provider: OnceLock::new(),
            spend: OnceLock::new(),
        });
        let mut found = self
            .found
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if found.len() < KEPT_SERIES {
            found.insert(of.into(), Arc::clone(&series));
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &Metrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn a_streamed_call_is_counted_in_every_series_it_touches() {
        let m = Metrics::new(LabelCaps::default());
        let (model, provider): (Text, Text) = ("llama".into(), "vllm-1".into());
        m.record(&CallRecord {
            edge: Edge::Http,
            operation: Operation(Api::Chat),
            model: &model,
            provider: Some(&provider),
            tenant: Some("acme"),
            feature: Some("search"),
            code: "ok",
            status_class: "2xx",
            duration: Duration::from_millis(1_100),
            first_token: Some(Duration::from_millis(100)),
            queue_wait: Some(Duration::from_millis(5)),
            upstream: Some(Duration::from_millis(1_000)),
            tokens: Some(Tokens {
                input: 30,
                output: 11,
                cached_input: 10,
            }),
            cost_micro_usd: 42,
        });
        let text = exposition(&m);
        for line in [
            r#"meridian_requests_total{edge="http",gen_ai_operation_name="chat",gen_ai_request_model="llama",provider="vllm-1",code="ok",status_class="2xx"} 1"#,
            r#"gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="llama"} 1"#,
            // (1.1 s - 0.1 s) / (11 - 1) tokens.
            r#"gen_ai_server_time_per_output_token_seconds_sum{gen_ai_operation_name="chat",gen_ai_request_model="llama"} 0.1"#,
            r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="vllm-1",gen_ai_request_model="llama",gen_ai_token_type="input"} 30.0"#,
            r#"meridian_tokens_total{model="llama",provider="vllm-1",tenant="acme",feature="search",type="cached_input"} 10"#,
            r#"meridian_cost_micro_usd_total{model="llama",provider="vllm-1",tenant="acme",feature="search"} 42"#,
            r#"meridian_queue_wait_seconds_count{provider="vllm-1"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn tenants_past_the_cap_share_one_series() {
        let m = Metrics::new(LabelCaps {
            tenants: 2,
            features: 1,
        });
        let (model, provider): (Text, Text) = ("m".into(), "p".into());
        for tenant in ["a", "b", "c", "d", "a"] {
            m.record(&CallRecord {
                edge: Edge::Grpc,
                operation: Operation(Api::Chat),
                model: &model,
                provider: Some(&provider),
                tenant: Some(tenant),
                feature: None,
                code: "ok",
                status_class: "2xx",
                duration: Duration::from_millis(10),
                first_token: None,
                queue_wait: None,
                upstream: None,
                tokens: Some(Tokens {
                    input: 1,
                    output: 1,
                    cached_input: 0,
                }),
                cost_micro_usd: 1,
            });
        }
        let text = exposition(&m);
        let cost = |tenant: &str| {
            format!(
                r#"meridian_cost_micro_usd_total{{model="m",provider="p",tenant="{tenant}",feature=""}}"#
            )
        };
        assert!(text.contains(&format!("{} 2", cost("a"))), "{text}");
        assert!(text.contains(&format!("{} 1", cost("b"))), "{text}");
        assert!(text.contains(&format!("{} 2", cost("other"))), "{text}");
        assert!(!text.contains(&cost("c")), "{text}");
    }

    #[test]
    fn admissions_are_counted_by_result_and_the_limit_that_refused() {
        let m = Metrics::new(LabelCaps::default());
        let limited = ApiError::new(ErrorKind::RateLimited, "over").with_code("tokens_per_minute");
        let unavailable =
            ApiError::new(ErrorKind::Unavailable, "no slice").with_code("quota_unavailable");
        let other = ApiError::new(ErrorKind::InvalidRequest, "bad feature").with_code("feature");
        m.quota_decision::<()>(&Ok(Some(())));
        m.quota_decision::<()>(&Ok(Some(())));
        m.quota_decision::<()>(&Ok(None));
        m.quota_decision::<()>(&Err(limited));
        m.quota_decision::<()>(&Err(unavailable));
        m.quota_decision::<()>(&Err(other));
        let text = exposition(&m);
        for line in [
            r#"meridian_quota_decisions_total{result="admitted",limit="none"} 2"#,
            r#"meridian_quota_decisions_total{result="limited",limit="tokens_per_minute"} 1"#,
            r#"meridian_quota_decisions_total{result="unavailable",limit="none"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert_eq!(
            text.matches("meridian_quota_decisions_total{").count(),
            3,
            "{text}"
        );
    }
}
