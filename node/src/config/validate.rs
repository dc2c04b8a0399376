//! A [`RawConfig`] checked, section by section, into a [`Config`]: every problem is collected
//! with its field path and reported at once. Providers and aliases are checked in
//! `providers.rs`, `[[vllm]]` groups in `vllm.rs`.

use super::*;

mod cluster;

pub(super) fn validate(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut e = Errors::default();

    let node = NodeConfig {
        id: match raw.node.id {
            None => 1,
            Some(id) if id >= 1 => id as u64,
            Some(id) => {
                e.push("node.id", format!("must be a positive integer, got {id}"));
                1
            }
        },
        region: raw.node.region.unwrap_or_else(|| "local".into()),
        data_dir: PathBuf::from(
            raw.node
                .data_dir
                .unwrap_or_else(|| "./meridian-data".into()),
        ),
    };
    if node.region.is_empty() {
        e.push("node.region", "must not be empty");
    }
    let (raft, cluster) = cluster::validate(&mut e, &raw.cluster, node.id, env);
    let http = HttpConfig {
        listen: addr(
            &mut e,
            "http.listen",
            raw.http.listen.as_ref(),
            "127.0.0.1:8080",
        ),
        max_body_bytes: int(
            &mut e,
            "http.max_body_bytes",
            raw.http.max_body_bytes,
            4 * 1024 * 1024,
            1024,
            i64::from(u32::MAX),
        ) as usize,
        header_read_timeout: duration(
            &mut e,
            "http.header_read_timeout",
            raw.http.header_read_timeout.as_ref(),
            Duration::from_secs(10),
        ),
        sse_heartbeat: duration(
            &mut e,
            "http.sse_heartbeat",
            raw.http.sse_heartbeat.as_ref(),
            Duration::from_secs(15),
        ),
        body_timeout: duration(
            &mut e,
            "http.body_timeout",
            raw.http.body_timeout.as_ref(),
            Duration::from_secs(60),
        ),
        min_body_rate: u64::from(int(
            &mut e,
            "http.min_body_rate",
            raw.http.min_body_rate,
            1024,
            0,
            i64::from(u32::MAX),
        )),
        max_connections: int(
            &mut e,
            "http.max_connections",
            raw.http.max_connections,
            10_000,
            1,
            1_000_000,
        ) as usize,
        max_connections_per_client: int(
            &mut e,
            "http.max_connections_per_client",
            raw.http.max_connections_per_client,
            1_000,
            0,
            1_000_000,
        ) as usize,
    };
    let grpc_listen = addr(
        &mut e,
        "grpc.listen",
        raw.grpc.listen.as_ref(),
        "127.0.0.1:50051",
    );
    let admin_listen = addr(
        &mut e,
        "admin.listen",
        raw.admin.listen.as_ref(),
        "127.0.0.1:50052",
    );
    let admin_token = secret_env(
        &mut e,
        env,
        "admin.token_env",
        raw.admin.token_env.as_ref(),
        32,
    );
    let admin_tls = admin_tls(&mut e, &raw.admin, cluster.as_ref(), node.id);
    let mut quota = QuotaConfig::default();
    let quota_duration = |e: &mut Errors, field: &str, v: Option<&String>, into: &mut Duration| {
        if let Some(v) = v {
            match parse_duration(v) {
                Ok(d) if !d.is_zero() => *into = d,
                Ok(_) => e.push(format!("quota.{field}"), "must be longer than 0"),
                Err(m) => e.push(format!("quota.{field}"), m),
            }
        }
    };
    let q = &raw.quota;
    for (field, v, into) in [
        ("flush_every", &q.flush_every, &mut quota.flush_every),
        ("grant_ttl", &q.grant_ttl, &mut quota.grant_ttl),
        ("grant_wait", &q.grant_wait, &mut quota.grant_wait),
    ] {
        quota_duration(&mut e, field, v.as_ref(), into);
    }
    quota.state_dir = Some(node.data_dir.clone());
    // Shares are split among at least the initial voters, even before all have registered.
    quota.min_nodes = raw.cluster.peers.len() as u64 + 1;
    match q.static_share {
        None => {}
        Some(f) if (0.0..=1.0).contains(&f) => quota.static_share = f,
        Some(f) => e.push("quota.static_share", format!("{f} is not between 0 and 1")),
    }
    for (field, v, into, min, max) in [
        (
            "usage_retention_days",
            q.usage_retention_days,
            &mut quota.usage_retention_days,
            1,
            3660,
        ),
        (
            "image_tokens",
            q.image_tokens,
            &mut quota.image_tokens,
            0,
            1_000_000,
        ),
        (
            "usage_users_per_day",
            q.usage_users_per_day,
            &mut quota.usage_users_per_day,
            0,
            1_000_000,
        ),
    ] {
        // An absent field keeps its default (it is not passed through the reader's `u32`); a bad
        // one is an error, and the configuration is refused.
        if v.is_some() {
            let path = format!("quota.{field}");
            *into = u64::from(int(&mut e, &path, v, 0, min, max));
        }
    }
    for (limit, policy) in &raw.quota.no_quorum {
        let path = format!("quota.no_quorum.{limit}");
        let Some(kind) = LimitKind::ALL.into_iter().find(|k| k.code() == limit) else {
            e.push(
                path,
                "is not a limit (requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month)",
            );
            continue;
        };
        match policy.as_str() {
            "deny" => {
                quota.no_quorum.insert(kind, NoQuorum::Deny);
            }
            "local_share" => {
                quota.no_quorum.insert(kind, NoQuorum::LocalShare);
            }
            other => e.push(
                path,
                format!("{other:?} is not \"deny\" or \"local_share\""),
            ),
        }
    }
    let jwt = raw.jwt.as_ref().and_then(|j| {
        let mut required = |field: &str, v: &Option<String>| match v {
            Some(s) if !s.is_empty() => s.clone(),
            _ => {
                e.push(format!("jwt.{field}"), "is required when [jwt] is set");
                String::new()
            }
        };
        let issuer = required("issuer", &j.issuer);
        let audience = required("audience", &j.audience);
        let leeway = match j.leeway.as_deref().map(parse_duration) {
            None => Duration::from_secs(30),
            Some(Ok(d)) => d,
            Some(Err(m)) => {
                e.push("jwt.leeway", m);
                Duration::from_secs(30)
            }
        };
        let hs256_secret = secret_env(
            &mut e,
            env,
            "jwt.hs256_secret_env",
            j.hs256_secret_env.as_ref(),
            32,
        )
        .map(|s| s.0.into_bytes());
        let jwks = match &j.jwks_file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(err) => {
                    e.push("jwt.jwks_file", format!("cannot read {path}: {err}"));
                    None
                }
            },
        };
        let settings = JwtSettings {
            issuer,
            audience,
            leeway,
            hs256_secret,
            jwks,
            tenant_claim: j.tenant_claim.clone().unwrap_or_else(|| "tenant".into()),
            tier_claim: j.tier_claim.clone(),
        };
        match JwtVerifier::new(settings) {
            Ok(v) => Some(Arc::new(v)),
            Err(m) => {
                let field = if j.jwks_file.is_some() {
                    "jwt.jwks_file"
                } else {
                    "jwt"
                };
                e.push(field, m.to_string());
                None
            }
        }
    });
    let mut prices = std::collections::HashMap::new();
    for (i, p) in raw.prices.iter().enumerate() {
        let at = |f: &str| format!("prices[{i}].{f}");
        let usd = |e: &mut Errors, f: &str, v: Option<f64>| match v {
            Some(x) if x.is_finite() && (0.0..=1e6).contains(&x) => x,
            Some(x) => {
                e.push(
                    at(f),
                    format!("{x} is not a price between 0 and 1000000 USD per million tokens"),
                );
                0.0
            }
            None => {
                e.push(at(f), "is required");
                0.0
            }
        };
        // USD per million tokens, as price lists give them, to whole µ$ per million.
        let micro = |usd: f64| (usd * 1_000_000.0).round() as u64;
        let optional =
            |e: &mut Errors, f: &str, v: Option<f64>| v.map(|x| micro(usd(e, f, Some(x))));
        let cached_input = optional(
            &mut e,
            "cached_input_usd_per_mtok",
            p.cached_input_usd_per_mtok,
        );
        let cache_write = optional(
            &mut e,
            "cache_write_usd_per_mtok",
            p.cache_write_usd_per_mtok,
        );
        let reasoning = optional(&mut e, "reasoning_usd_per_mtok", p.reasoning_usd_per_mtok);
        let price = Rates {
            input: micro(usd(&mut e, "input_usd_per_mtok", p.input_usd_per_mtok)),
            cached_input,
            cache_write,
            output: micro(usd(&mut e, "output_usd_per_mtok", p.output_usd_per_mtok)),
            reasoning,
        };
        match p.model.as_deref() {
            Some(m) if !m.is_empty() => {
                if prices.insert(m.to_owned(), price).is_some() {
                    e.push(at("model"), format!("{m:?} is priced twice"));
                }
            }
            _ => e.push(at("model"), "is required"),
        }
    }
    let cache = if raw.cache.enabled.unwrap_or(true) {
        let mut c = CacheConfig::default();
        match raw.cache.max_entries {
            None => {}
            Some(n) if (0..=10_000_000).contains(&n) => c.max_entries = n as usize,
            Some(n) => e.push(
                "cache.max_entries",
                format!("must be between 0 and 10000000, got {n}"),
            ),
        }
        match raw.cache.max_bytes {
            None => {}
            Some(n) if (0..=1 << 40).contains(&n) => c.max_bytes = n as usize,
            Some(n) => e.push(
                "cache.max_bytes",
                format!("must be between 0 and 1099511627776, got {n}"),
            ),
        }
        if let Some(t) = &raw.cache.ttl {
            match parse_duration(t) {
                Ok(d) if !d.is_zero() => c.ttl = d,
                Ok(_) => e.push("cache.ttl", "must be longer than 0"),
                Err(m) => e.push("cache.ttl", m),
            }
        }
        Some(c)
    } else {
        None
    };
    let breaker = breaker(&mut e, &raw.breaker);
    let auth = AuthConfig {
        enabled: raw.auth.enabled.unwrap_or(true),
        dev_key: raw.auth.dev_key.unwrap_or(true),
    };
    let mut seen = HashSet::new();
    for (path, a) in [
        ("http.listen", http.listen),
        ("grpc.listen", grpc_listen),
        ("admin.listen", admin_listen),
    ] {
        if a.port() != 0 && !seen.insert(a) {
            e.push(path, format!("{a} is already used by another listener"));
        }
    }
    let defaults = RequestLimits::default();
    let limits = RequestLimits {
        max_messages: int(
            &mut e,
            "limits.max_messages",
            raw.limits.max_messages,
            u32::try_from(defaults.max_messages).unwrap_or(u32::MAX),
            1,
            1_000_000,
        ) as usize,
        max_output_tokens: int(
            &mut e,
            "limits.max_output_tokens",
            raw.limits.max_output_tokens,
            defaults.max_output_tokens,
            1,
            10_000_000,
        ),
        max_n: int(
            &mut e,
            "limits.max_n",
            raw.limits.max_n,
            defaults.max_n,
            1,
            128,
        ),
    };
    let caps = LabelCaps::default();
    let label_caps = LabelCaps {
        tenants: int(
            &mut e,
            "metrics.tenant_labels",
            raw.metrics.tenant_labels,
            caps.tenants as u32,
            0,
            100_000,
        ) as usize,
        features: int(
            &mut e,
            "metrics.feature_labels",
            raw.metrics.feature_labels,
            caps.features as u32,
            0,
            10_000,
        ) as usize,
    };
    let mut otlp =
        |signal: &str, endpoint: &Option<String>, protocol: &Option<String>, path: [&str; 2]| {
            let field = |problem: &str| {
                if problem.contains("grpc or") {
                    path[1]
                } else {
                    path[0]
                }
            };
            match crate::otlp::target(endpoint.as_deref(), protocol.as_deref(), signal, &|k| {
                env.get(k)
            }) {
                Ok(t) => t,
                Err(problem) => {
                    e.push(field(&problem), problem);
                    None
                }
            }
        };
    let traces = otlp(
        "TRACES",
        &raw.traces.endpoint,
        &raw.traces.protocol,
        ["traces.endpoint", "traces.protocol"],
    );
    let calls_otlp = otlp(
        "LOGS",
        &raw.calls.otlp_endpoint,
        &raw.calls.otlp_protocol,
        ["calls.otlp_endpoint", "calls.otlp_protocol"],
    );
    let retention_days = int(
        &mut e,
        "calls.retention_days",
        raw.calls.retention_days,
        30,
        1,
        3_650,
    );
    let calls_retention = raw
        .calls
        .enabled
        .unwrap_or(true)
        .then(|| Duration::from_secs(u64::from(retention_days) * 86_400));
    let alerts = alerts(&mut e, &raw.alerts);
    let drain_timeout = duration(
        &mut e,
        "shutdown.drain_timeout",
        raw.shutdown.drain_timeout.as_ref(),
        Duration::from_secs(30),
    );
    let unready_period = match raw.shutdown.unready_period.as_deref().map(parse_duration) {
        None => Duration::ZERO,
        Some(Ok(d)) if d <= Duration::from_secs(300) => d,
        Some(Ok(d)) => {
            e.push(
                "shutdown.unready_period",
                format!("{d:?} is longer than 5 minutes"),
            );
            Duration::ZERO
        }
        Some(Err(m)) => {
            e.push("shutdown.unready_period", m);
            Duration::ZERO
        }
    };

    if raw.providers.is_empty() && raw.vllm.is_empty() {
        e.push(
            "providers",
            "at least one provider (or a [[vllm]] section) is required",
        );
    }
    let providers = providers::validate(&mut e, raw.providers, env, &node.region);
    let listeners: Vec<(String, u16)> = [
        ("http.listen", http.listen),
        ("grpc.listen", grpc_listen),
        ("admin.listen", admin_listen),
    ]
    .iter()
    .filter(|(_, a)| a.port() != 0)
    .map(|(name, a)| ((*name).to_owned(), a.port()))
    .collect();
    let vllm = vllm::validate(
        &mut e,
        &raw.vllm,
        &node.region,
        &listeners,
        cluster.is_some(),
    );
    let served: HashSet<&str> = providers
        .iter()
        .flat_map(|p| p.models.iter().map(|m| m.name.as_str()))
        .chain(vllm.iter().flat_map(|g| {
            g.served_names
                .iter()
                .chain(g.lora_modules.iter().map(|l| &l.name))
                .map(String::as_str)
        }))
        .collect();
    let aliases = providers::aliases(&mut e, &raw.aliases, &served);

    if !e.0.is_empty() {
        return Err(ConfigError { errors: e.0 });
    }
    Ok(Config {
        aliases,
        node,
        http,
        grpc_listen,
        admin_listen,
        admin_token,
        admin_tls,
        auth,
        quota,
        jwt,
        prices,
        cache,
        breaker,
        limits,
        label_caps,
        calls_retention,
        traces,
        calls_otlp,
        alerts,
        drain_timeout,
        unready_period,
        providers,
        raft,
        cluster,
        vllm,
        nvidia_smi: raw
            .gpus
            .nvidia_smi
            .clone()
            .unwrap_or_else(|| "nvidia-smi".into()),
    })
}

/// `[alerts]`: the webhook must be an http(s) URL, fractions above 0 (at most 10: ten times the
/// cap), amounts above 0.
fn alerts(e: &mut Errors, raw: &super::raw::RawAlerts) -> crate::alerts::AlertsConfig {
    let mut config = crate::alerts::AlertsConfig::default();
    if let Some(url) = &raw.webhook {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => config.webhook = Some(u),
            Ok(_) => e.push(
                "alerts.webhook",
                format!("{url:?} is not an http:// or https:// URL"),
            ),
            Err(err) => e.push("alerts.webhook", format!("{url:?} is not a URL: {err}")),
        }
    }
    if let Some(fractions) = &raw.cap_fractions {
        match fractions.iter().find(|f| !(**f > 0.0 && **f <= 10.0)) {
            Some(bad) => e.push(
                "alerts.cap_fractions",
                format!("{bad} is not a fraction of the cap above 0 (and at most 10)"),
            ),
            None => config.cap_fractions = fractions.clone(),
        }
    }
    if let Some(amounts) = &raw.daily_usd {
        match amounts.iter().find(|a| !(**a > 0.0 && **a < 1e9)) {
            Some(bad) => e.push(
                "alerts.daily_usd",
                format!("{bad} is not an amount of dollars above 0"),
            ),
            None => {
                config.daily_micro_usd = amounts.iter().map(|a| (a * 1e6).round() as u64).collect()
            }
        }
    }
    config.check_every = duration(
        e,
        "alerts.check_every",
        raw.check_every.as_ref(),
        config.check_every,
    );
    config
}

/// `HOST:PORT` where HOST is an IP address or a DNS name: the text as given, if it is one.
/// `[breaker]`.
fn breaker(e: &mut Errors, b: &super::raw::RawBreaker) -> BreakerConfig {
    let d = BreakerConfig::default();
    let rate = |e: &mut Errors, path: &str, v: Option<f64>, default: f64| match v {
        None => default,
        Some(r) if (0.0..=1.0).contains(&r) && r > 0.0 => r,
        Some(r) => {
            e.push(path, format!("must be in (0, 1], got {r}"));
            default
        }
    };
    let c = BreakerConfig {
        consecutive_failures: int(
            e,
            "breaker.consecutive_failures",
            b.consecutive_failures,
            d.consecutive_failures,
            1,
            1_000_000,
        ),
        error_rate: rate(e, "breaker.error_rate", b.error_rate, d.error_rate),
        min_calls: int(
            e,
            "breaker.min_calls",
            b.min_calls,
            d.min_calls,
            1,
            1_000_000,
        ),
        window: duration(e, "breaker.window", b.window.as_ref(), d.window),
        slow_call: duration(e, "breaker.slow_call", b.slow_call.as_ref(), d.slow_call),
        slow_rate: rate(e, "breaker.slow_rate", b.slow_rate, d.slow_rate),
        open_base: duration(e, "breaker.open_base", b.open_base.as_ref(), d.open_base),
        open_max: duration(e, "breaker.open_max", b.open_max.as_ref(), d.open_max),
        probes: int(e, "breaker.probes", b.probes, d.probes, 1, 1_000),
        probe_grace: duration(
            e,
            "breaker.probe_grace",
            b.probe_grace.as_ref(),
            d.probe_grace,
        ),
        lone_tenant_share: rate(
            e,
            "breaker.lone_tenant_share",
            b.lone_tenant_share,
            d.lone_tenant_share,
        ),
    };
    if c.open_max < c.open_base {
        e.push(
            "breaker.open_max",
            "must not be shorter than breaker.open_base",
        );
    }
    c
}

/// A secret read from the environment variable that `path` names: set, and at least `min_len`
/// bytes long.
fn secret_env(
    e: &mut Errors,
    env: &dyn Env,
    path: &str,
    var: Option<&String>,
    min_len: usize,
) -> Option<Secret> {
    let var = var?;
    match env.get(var) {
        Some(v) if v.len() >= min_len => Some(Secret(v)),
        Some(_) => {
            e.push(path, format!("${var} must hold at least {min_len} bytes"));
            None
        }
        None => {
            e.push(path, format!("${var} is not set"));
            None
        }
    }
}

/// `v` (or `default`) as a socket address; a bad one is reported at `path`.
fn addr(e: &mut Errors, path: &str, v: Option<&String>, default: &str) -> SocketAddr {
    let s = v.map_or(default, String::as_str);
    s.parse::<SocketAddr>().unwrap_or_else(|_| {
        e.push(
            path,
            format!("{s:?} is not a socket address like 127.0.0.1:8080"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn host_port(text: &str) -> Option<String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Some(text.to_owned());
    }
    let (host, port) = text.rsplit_once(':')?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    (name_ok && port.parse::<u16>().is_ok_and(|p| p > 0)).then(|| text.to_owned())
}

/// The admin API's TLS identity: from `tls_cert` and `tls_key`, or the node's cluster
/// certificate (`tls_from_cluster`); read now, so that a missing or unreadable file is named.
fn admin_tls(
    e: &mut Errors,
    raw: &RawAdmin,
    cluster: Option<&ClusterPeers>,
    node_id: u64,
) -> Option<AdminTls> {
    let read = |e: &mut Errors, field: &str, path: &std::path::Path| match std::fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => Some(bytes),
        Ok(_) => {
            e.push(field, format!("{} is empty", path.display()));
            None
        }
        Err(err) => {
            e.push(field, format!("cannot read {}: {err}", path.display()));
            None
        }
    };
    let from_cluster = raw.tls_from_cluster.unwrap_or(false);
    let (cert, key) = match (&raw.tls_cert, &raw.tls_key, from_cluster) {
        (None, None, false) => return None,
        (Some(c), Some(k), false) => (
            read(e, "admin.tls_cert", std::path::Path::new(c)),
            read(e, "admin.tls_key", std::path::Path::new(k)),
        ),
        (None, None, true) => {
            let Some(c) = cluster else {
                e.push(
                    "admin.tls_from_cluster",
                    "needs [cluster] (its certs_dir holds the node's certificate)",
                );
                return None;
            };
            (
                read(
                    e,
                    "admin.tls_from_cluster",
                    &c.certs_dir.join(format!("node-{node_id}.crt")),
                ),
                read(
                    e,
                    "admin.tls_from_cluster",
                    &c.certs_dir.join(format!("node-{node_id}.key")),
                ),
            )
        }
        (_, _, true) => {
            e.push(
                "admin.tls_from_cluster",
                "takes the place of tls_cert and tls_key: set one or the other",
            );
            return None;
        }
        (Some(_), None, false) => {
            e.push("admin.tls_key", "is required with tls_cert");
            return None;
        }
        (None, Some(_), false) => {
            e.push("admin.tls_cert", "is required with tls_key");
            return None;
        }
    };
    Some(AdminTls {
        cert_pem: cert?,
        key_pem: Secret(String::from_utf8_lossy(&key?).into_owned()),
    })
}
