//! `[[providers]]` and `[[aliases]]`: each entry checked into what the gateway routes to.

use super::*;

/// The `[[providers]]` entries, checked (ids unique, kinds known, URLs, keys from the named
/// environment variables, models, prices, timeouts). A provider without a region is in the
/// node's (`region`).
pub(super) fn validate(
    e: &mut Errors,
    raw: Vec<RawProvider>,
    env: &dyn Env,
    region: &str,
) -> Vec<ProviderConfig> {
    let mut ids = HashSet::new();
    let mut providers = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let entry = Entry(format!("providers[{i}]"));
        let at = |field: &str| entry.at(field);
        let id = entry.required(e, "id", &p.id);
        if !id.is_empty() && !ids.insert(id.clone()) {
            e.push(at("id"), format!("{id:?} is used by another provider"));
        }
        // Anthropic requires a cap on every request; its default stays what it was.
        let default_max_tokens = int(
            e,
            &at("default_max_tokens"),
            p.default_max_tokens,
            if p.kind.as_deref() == Some("anthropic") {
                4096
            } else {
                crate::config::DEFAULT_MAX_TOKENS
            },
            1,
            1_000_000,
        );
        let kind = match p.kind.as_deref() {
            Some(name @ ("openai" | "vllm" | "anthropic")) => {
                let dialect = match name {
                    "openai" => Dialect::OpenAi,
                    "vllm" => Dialect::Vllm,
                    _ => Dialect::Anthropic { default_max_tokens },
                };
                let default_base = match dialect {
                    Dialect::OpenAi | Dialect::Vllm => None,
                    Dialect::Anthropic { .. } => Some("https://api.anthropic.com/v1"),
                };
                let base_url = p
                    .base_url
                    .clone()
                    .or(default_base.map(str::to_owned))
                    .unwrap_or_default();
                if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                    e.push(
                        at("base_url"),
                        format!("{base_url:?} must be an http:// or https:// URL"),
                    );
                }
                let api_key = match &p.api_key_env {
                    None => None,
                    Some(var) => match env.get(var) {
                        Some(v) if !v.is_empty() => Some(Secret(v)),
                        _ => {
                            e.push(
                                at("api_key_env"),
                                format!("environment variable {var} is not set"),
                            );
                            None
                        }
                    },
                };
                ProviderKind::Api {
                    dialect,
                    base_url,
                    api_key,
                }
            }
            Some("demo") => {
                for (field, set) in [
                    ("base_url", p.base_url.is_some()),
                    ("api_key_env", p.api_key_env.is_some()),
                ] {
                    if set {
                        e.push(at(field), "does not apply to a demo provider");
                    }
                }
                ProviderKind::Demo {
                    word_delay: match &p.word_delay {
                        None => Duration::from_millis(20),
                        Some(s) => parse_duration(s).unwrap_or_else(|m| {
                            e.push(at("word_delay"), m);
                            Duration::ZERO
                        }),
                    },
                }
            }
            Some(other) => {
                e.push(
                    at("kind"),
                    format!(
                        "unknown kind {other:?} (expected \"openai\", \"vllm\", \"anthropic\" or \"demo\")"
                    ),
                );
                continue;
            }
            None => {
                e.push(
                    at("kind"),
                    "is required (\"openai\", \"vllm\", \"anthropic\" or \"demo\")",
                );
                continue;
            }
        };
        if p.word_delay.is_some() && !matches!(kind, ProviderKind::Demo { .. }) {
            e.push(at("word_delay"), "applies only to a demo provider");
        }
        if p.models.is_empty() {
            e.push(at("models"), "must list at least one model");
        }
        let mut models = Vec::new();
        for (j, m) in p.models.iter().enumerate() {
            let (name, upstream) = m.split_once('=').unwrap_or((m, m));
            let (name, upstream) = (name.trim(), upstream.trim());
            if name.is_empty() || upstream.is_empty() {
                e.push(
                    at(&format!("models[{j}]")),
                    format!("{m:?} must be \"name\" or \"name=upstream_name\""),
                );
                continue;
            }
            models.push(ModelRoute {
                name: name.to_owned(),
                upstream_name: upstream.to_owned(),
            });
        }
        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect: entry.dur(e, "connect_timeout", &p.connect_timeout, d.connect),
            first_byte: entry.dur(e, "first_byte_timeout", &p.first_byte_timeout, d.first_byte),
            idle: entry.dur(e, "idle_timeout", &p.idle_timeout, d.idle),
            total: entry.dur(e, "total_timeout", &p.total_timeout, d.total),
        };
        let tokenizer = match p.tokenizer.as_deref() {
            None => Tokenizer::default(),
            Some(name) if name.ends_with(".json") => {
                Tokenizer::from_file(name).unwrap_or_else(|why| {
                    e.push(
                        at("tokenizer"),
                        format!("the tokenizer file {name:?} cannot be used: {why}"),
                    );
                    Tokenizer::default()
                })
            }
            Some(name) => Tokenizer::parse(name).unwrap_or_else(|| {
                e.push(
                    at("tokenizer"),
                    format!(
                        "{name:?} is not a known tokenizer (o200k_base, cl100k_base, or a path to a model's tokenizer.json)"
                    ),
                );
                Tokenizer::default()
            }),
        };
        let mut usd = |field: &str, v: Option<f64>| match v {
            None => 0,
            Some(x) if x.is_finite() && (0.0..=1_000_000.0).contains(&x) => {
                (x * 1_000_000.0).round() as u64
            }
            Some(x) => {
                e.push(
                    at(field),
                    format!("must be between 0 and 1000000 USD, got {x}"),
                );
                0
            }
        };
        let price = ProviderPrice {
            input: usd("price_input", p.price_input),
            output: usd("price_output", p.price_output),
            cached_input: usd("price_cached_input", p.price_cached_input),
        };
        let discover = if p.discover.unwrap_or(false) {
            if !matches!(kind, ProviderKind::Api { .. }) {
                e.push(
                    at("discover"),
                    "applies only to a provider reached over HTTP",
                );
            }
            Some(entry.dur(
                e,
                "discover_every",
                &p.discover_every,
                Duration::from_secs(10),
            ))
        } else {
            if p.discover_every.is_some() {
                e.push(at("discover_every"), "applies only with discover = true");
            }
            None
        };
        providers.push(ProviderConfig {
            default_max_tokens,
            discover,
            tokenizer,
            prefix_affinity: p.prefix_affinity.unwrap_or(false),
            weight: entry.num(e, "weight", p.weight, 1, 1, 1_000),
            price,
            id,
            region: p.region.clone().unwrap_or_else(|| region.to_owned()),
            kind,
            models,
            max_concurrency: entry.num(e, "max_concurrency", p.max_concurrency, 64, 1, 1_000_000),
            queue_capacity: entry.num(e, "queue_capacity", p.queue_capacity, 256, 0, 1_000_000),
            queue_timeout: entry.dur(
                e,
                "queue_timeout",
                &p.queue_timeout,
                Duration::from_secs(10),
            ),
            timeouts,
        });
    }
    providers
}

/// The `[[aliases]]` (virtual models such as `auto`): names not taken by a served model, every
/// listed model one that is `served`, and their complexity rules.
pub(super) fn aliases(
    e: &mut Errors,
    raw: &[RawAlias],
    served: &HashSet<&str>,
) -> HashMap<String, Alias> {
    let mut aliases = HashMap::new();
    for (i, a) in raw.iter().enumerate() {
        let entry = Entry(format!("aliases[{i}]"));
        let at = |field: &str| entry.at(field);
        let name = entry.required(e, "name", &a.name);
        if !name.is_empty() && served.contains(name.as_str()) {
            e.push(
                at("name"),
                format!("{name:?} is already a model a provider serves"),
            );
        }
        for (tier, list) in [
            ("trivial", &a.trivial),
            ("moderate", &a.moderate),
            ("hard", &a.hard),
        ] {
            for (j, m) in list.iter().enumerate() {
                if !served.contains(m.as_str()) {
                    e.push(
                        at(&format!("{tier}[{j}]")),
                        format!("{m:?} is not a model any provider serves"),
                    );
                }
            }
        }
        if a.trivial.is_empty() && a.moderate.is_empty() && a.hard.is_empty() {
            e.push(at("hard"), "an alias needs at least one model in some tier");
        }
        let d = ComplexityRules::default();
        let tokens = |e: &mut Errors, field: &str, v: Option<i64>, default: u64| match v {
            None => default,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                e.push(at(field), format!("must not be negative, got {n}"));
                default
            }
        };
        let tier = |e: &mut Errors, field: &str, v: &Option<String>, default: Complexity| match v {
            None => default,
            Some(s) => Complexity::parse(s).unwrap_or_else(|| {
                e.push(at(field), format!("{s:?} is not trivial, moderate or hard"));
                default
            }),
        };
        let rules = ComplexityRules {
            trivial_below_tokens: tokens(
                e,
                "trivial_below_tokens",
                a.trivial_below_tokens,
                d.trivial_below_tokens,
            ),
            hard_from_tokens: tokens(
                e,
                "hard_from_tokens",
                a.hard_from_tokens,
                d.hard_from_tokens,
            ),
            code: tier(e, "code", &a.code, d.code),
            tools: tier(e, "tools", &a.tools, d.tools),
        };
        if rules.trivial_below_tokens > rules.hard_from_tokens {
            e.push(
                at("trivial_below_tokens"),
                "must not be above hard_from_tokens",
            );
        }
        if aliases
            .insert(
                name.clone(),
                Alias {
                    trivial: a.trivial.clone(),
                    moderate: a.moderate.clone(),
                    hard: a.hard.clone(),
                    rules,
                },
            )
            .is_some()
        {
            e.push(at("name"), format!("{name:?} is defined twice"));
        }
    }
    aliases
}
