use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

fn paths(err: &ConfigError) -> Vec<&str> {
    err.errors.iter().map(|e| e.path.as_str()).collect()
}

/// The kind of the provider `id` in `c`, which must have one.
fn kind_of<'c>(c: &'c Config, id: &str) -> &'c ProviderKind {
    let provider = c.providers.iter().find(|p| p.id == id);
    &provider.unwrap_or_else(|| panic!("{id} added")).kind
}

#[test]
fn the_embedded_default_serves_the_demo_model() {
    let c = load(None, &env(&[])).expect("default is valid");
    assert_eq!(c.providers.len(), 1);
    assert_eq!(c.providers[0].models[0].name, "demo");
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.http.max_body_bytes, 4 * 1024 * 1024);

    let c = load(None, &env(&[("OPENAI_API_KEY", "sk-test-secret")])).expect("valid");
    let ProviderKind::Api {
        dialect: Dialect::OpenAi,
        api_key,
        ..
    } = kind_of(&c, "openai")
    else {
        panic!("openai kind");
    };
    assert_eq!(api_key.as_ref().map(Secret::expose), Some("sk-test-secret"));

    let c = load(None, &env(&[("ANTHROPIC_API_KEY", "sk-ant-secret")])).expect("valid");
    let ProviderKind::Api {
        dialect: Dialect::Anthropic { default_max_tokens },
        api_key,
        base_url,
    } = kind_of(&c, "anthropic")
    else {
        panic!("anthropic kind");
    };
    assert_eq!(*default_max_tokens, 4096);
    assert_eq!(base_url, "https://api.anthropic.com/v1");
    assert_eq!(api_key.as_ref().map(Secret::expose), Some("sk-ant-secret"));
    assert!(
        !format!("{c:?}").contains("sk-ant-secret"),
        "secrets never reach Debug"
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let err = load(
        Some("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n"),
        &env(&[]),
    )
    .expect_err("unknown key");
    assert_eq!(paths(&err), ["http.lisen"]);
    assert!(err.to_string().contains("lisen"), "{err}");

    let err = load(
        Some("[[providers]]\nid = \"a\"\nkind = \"demo\"\nmodels = [\"m\"]\ncolour = 1\n"),
        &env(&[]),
    )
    .expect_err("unknown key");
    assert!(paths(&err)[0].starts_with("providers[0]"), "{err}");
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let text = r#"
[http]
listen = "not an address"
max_body_bytes = 12
sse_heartbeat = "5 parsecs"

[grpc]
listen = "127.0.0.1:9000"

[admin]
listen = "127.0.0.1:9000"

[[providers]]
id = "a"
kind = "openai"
base_url = "ftp://x"
api_key_env = "NOT_SET_ANYWHERE"
models = ["m", "=x"]
max_concurrency = 0
queue_timeout = "0s"

[[providers]]
id = "a"
kind = "magic"
models = ["m"]

[node]
id = 0

[cluster]
heartbeat = "2s"
peers = ["127.0.0.2:7000"]
certs_dir = "/nonexistent"

[breaker]
lone_tenant_share = 1.5
"#;
    let err = load(Some(text), &env(&[])).expect_err("invalid");
    let got = paths(&err);
    for want in [
        "http.listen",
        "http.max_body_bytes",
        "http.sse_heartbeat",
        "admin.listen",
        "providers[0].base_url",
        "providers[0].api_key_env",
        "providers[0].models[1]",
        "providers[0].max_concurrency",
        "providers[0].queue_timeout",
        "providers[1].id",
        "providers[1].kind",
        "node.id",
        "cluster.election_timeout_min",
        "cluster.peers[0]",
        "cluster.certs_dir",
        "breaker.lone_tenant_share",
    ] {
        assert!(got.contains(&want), "missing {want} in {got:?}");
    }
}

#[test]
fn type_errors_name_the_field() {
    let err = load(Some("[limits]\nmax_n = \"eight\"\n"), &env(&[])).expect_err("type error");
    assert_eq!(paths(&err), ["limits.max_n"]);
    let err = load(Some("[node]\nid = \"node-1\"\n"), &env(&[])).expect_err("type error");
    assert_eq!(paths(&err), ["node.id"]);
}

#[test]
fn environment_overrides_fields_and_names_bad_ones() {
    let text = "[[providers]]\nid = \"a\"\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nmodels = [\"m\"]\n";
    let c = load(
        Some(text),
        &env(&[
            ("MERIDIAN_HTTP__LISTEN", "0.0.0.0:9999"),
            ("MERIDIAN_PROVIDERS__0__MAX_CONCURRENCY", "7"),
            ("MERIDIAN_PROVIDERS__0__MODELS", "[\"x\", \"y=z\"]"),
            ("MERIDIAN_LOG", "debug"),
        ]),
    )
    .expect("valid");
    assert_eq!(c.http.listen.to_string(), "0.0.0.0:9999");
    assert_eq!(c.providers[0].max_concurrency, 7);
    assert_eq!(c.providers[0].models[1].upstream_name, "z");

    let err = load(
        Some(text),
        &env(&[
            ("MERIDIAN_PROVIDERS__3__ID", "b"),
            ("MERIDIAN_HTTP__NOPE", "1"),
        ]),
    )
    .expect_err("bad overrides");
    let got = paths(&err);
    assert!(got.contains(&"MERIDIAN_PROVIDERS__3__ID"), "{got:?}");
    // A field that does not exist is caught by the unknown-key check.
    let err = load(Some(text), &env(&[("MERIDIAN_HTTP__NOPE", "1")])).expect_err("unknown");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn overrides_keep_the_case_of_map_keys_and_text_that_looks_like_a_number() {
    let text =
        "[[vllm]]\nid = \"llama\"\nmodel = \"m\"\ngpus = [0]\n[vllm.env]\nHF_HOME = \"/models\"\n";
    let c = load(
        Some(text),
        &env(&[
            // A text field given digits, and a map of the user's own keys.
            ("MERIDIAN_NODE__REGION", "2024"),
            ("MERIDIAN_VLLM__0__ENV__HF_HOME", "/data/hf"),
            ("MERIDIAN_VLLM__0__ENV__CUDA_LAUNCH_BLOCKING", "1"),
            // A numeric field still takes a number.
            ("MERIDIAN_VLLM__0__MAX_NUM_SEQS", "64"),
        ]),
    )
    .expect("valid");
    assert_eq!(c.node.region, "2024");
    let g = &c.vllm[0];
    assert_eq!(
        g.env,
        [
            ("CUDA_LAUNCH_BLOCKING".to_owned(), "1".to_owned()),
            ("HF_HOME".to_owned(), "/data/hf".to_owned())
        ]
    );
    assert_eq!(g.max_concurrency, 64);
    // A number where a number is wanted but out of range, or text where a number is wanted,
    // still names the field.
    let err = load(
        Some(text),
        &env(&[("MERIDIAN_VLLM__0__MAX_NUM_SEQS", "many")]),
    )
    .expect_err("not a number");
    assert!(err.to_string().contains("max_num_seqs"), "{err}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("10d").is_err());
}

#[test]
fn joining_nodes_need_a_reachable_address_and_mesh_settings_are_checked() {
    let text = r#"
[cluster]
join = true
listen = "0.0.0.0:7000"
certs_dir = "/nonexistent"
mesh_cookie_env = "MESH_COOKIE"
"#;
    let err = load(Some(text), &env(&[("MESH_COOKIE", "short")])).expect_err("invalid");
    let got = paths(&err);
    for want in [
        "cluster.listen",
        "cluster.certs_dir",
        "cluster.mesh_cookie_env",
    ] {
        assert!(got.contains(&want), "missing {want} in {got:?}");
    }

    let certs = tempfile::tempdir().expect("tempdir");
    for f in ["ca.crt", "node-1.crt", "node-1.key"] {
        std::fs::write(certs.path().join(f), "x").expect("write");
    }
    let text = format!(
        "[cluster]\njoin = true\nlisten = \"0.0.0.0:7000\"\nadvertise = \"10.0.0.4:7000\"\n\
         certs_dir = {:?}\nmesh_cookie_env = \"MESH_COOKIE\"\n\
         [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
        certs.path()
    );
    let c = load(
        Some(&text),
        &env(&[("MESH_COOKIE", "a-long-enough-shared-secret")]),
    )
    .expect("valid");
    let peers = c.cluster.expect("a multi-node member");
    assert!(peers.join && peers.peers.is_empty());
    assert_eq!(peers.advertise.to_string(), "10.0.0.4:7000");
    assert_eq!(peers.mesh_listen.to_string(), "0.0.0.0:7001");
    assert_eq!(peers.mesh_advertise.to_string(), "10.0.0.4:7001");
    assert_eq!(
        peers.mesh_cookie.as_ref().map(|c| c.expose()),
        Some("a-long-enough-shared-secret")
    );

    // Peers and the advertised address may be DNS names (a StatefulSet's stable names).
    let named = format!(
        "[cluster]\nlisten = \"0.0.0.0:7000\"\nadvertise = \"meridian-0.meridian.ns.svc:7000\"\n\
         peers = [\"2@meridian-1.meridian.ns.svc:7000\"]\ncerts_dir = {:?}\n\
         [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
        certs.path()
    );
    let peers = load(Some(&named), &env(&[]))
        .expect("names are valid")
        .cluster
        .expect("multi-node");
    assert_eq!(
        peers.peers,
        vec![(2, "meridian-1.meridian.ns.svc:7000".to_owned())]
    );
    assert_eq!(peers.advertise, "meridian-0.meridian.ns.svc:7000");
    assert_eq!(peers.mesh_advertise, "meridian-0.meridian.ns.svc:7001");
    let bad = named.replace("2@meridian-1.meridian.ns.svc:7000", "2@not a name:7000");
    let e = load(Some(&bad), &env(&[])).expect_err("refused");
    assert!(e.to_string().contains("cluster.peers[0]"), "{e}");
}

/// A configuration that opens with the OpenAI-style provider `p` on a local port: `rest` goes on
/// with `p`'s models and other fields, and may add sections of its own.
fn with_provider_p(rest: &str) -> String {
    format!(
        "[[providers]]\nid = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"{rest}"
    )
}

#[test]
fn aliases_and_anthropic_providers_are_checked_field_by_field() {
    let toml = with_provider_p(
        r#"
models = ["small", "big"]
default_max_tokens = 10

[[providers]]
id = "claude"
kind = "anthropic"
models = ["claude"]
default_max_tokens = 0

[[aliases]]
name = "auto"
trivial = ["small"]
hard = ["huge"]
code = "extreme"
trivial_below_tokens = 5000

[[aliases]]
name = "big"
moderate = ["big"]
"#,
    );
    let err = load(Some(&toml), &env(&[])).expect_err("invalid");
    assert_eq!(
        paths(&err),
        [
            "providers[1].default_max_tokens",
            "aliases[0].hard[0]",
            "aliases[0].code",
            "aliases[0].trivial_below_tokens",
            "aliases[1].name",
        ]
    );
    let ok = r#"
[[providers]]
id = "claude"
kind = "anthropic"
models = ["claude"]

[[aliases]]
name = "auto"
hard = ["claude"]
"#;
    let c = load(Some(ok), &env(&[])).expect("valid");
    assert_eq!(c.aliases["auto"].hard, ["claude"]);
    assert_eq!(c.aliases["auto"].rules.tools, Complexity::Hard);
}

#[test]
fn provider_weights_and_prices_are_checked() {
    let toml = with_provider_p(
        r#"
models = ["m"]
weight = 0
price_input = -1.0
price_output = 0.6
"#,
    );
    let err = load(Some(&toml), &env(&[])).expect_err("invalid");
    assert_eq!(
        paths(&err),
        ["providers[0].price_input", "providers[0].weight"]
    );
    let ok = toml
        .replace("weight = 0", "weight = 3")
        .replace("-1.0", "0.15");
    let c = load(Some(&ok), &env(&[])).expect("valid");
    assert_eq!(c.providers[0].weight, 3);
    assert_eq!(
        (c.providers[0].price.input, c.providers[0].price.output),
        (150_000, 600_000),
        "µ$ per million tokens"
    );
}

#[test]
fn spend_alerts_are_checked_field_by_field() {
    let toml = r#"
[[providers]]
id = "demo"
kind = "demo"
models = ["demo"]
[alerts]
webhook = "ftp://hooks.example.com/x"
cap_fractions = [0.5, 0.0]
daily_usd = [-3.0]
check_every = "soon"
"#;
    let err = load(Some(toml), &env(&[])).expect_err("invalid");
    assert_eq!(
        paths(&err),
        [
            "alerts.webhook",
            "alerts.cap_fractions",
            "alerts.daily_usd",
            "alerts.check_every"
        ]
    );
    let ok = toml
        .replace("ftp://", "https://")
        .replace("0.0]", "0.9]")
        .replace("-3.0", "250.5")
        .replace("soon", "5s");
    let c = load(Some(&ok), &env(&[])).expect("valid");
    assert_eq!(
        c.alerts.webhook.map(|u| u.to_string()),
        Some("https://hooks.example.com/x".into())
    );
    assert_eq!(c.alerts.cap_fractions, [0.5, 0.9]);
    assert_eq!(c.alerts.daily_micro_usd, [250_500_000]);
    assert_eq!(c.alerts.check_every, Duration::from_secs(5));
    // Not configured: the caps' 50, 80 and 100 %, logged and counted only.
    let plain = load(Some(&toml[..toml.find("[alerts]").unwrap()]), &env(&[])).expect("valid");
    assert_eq!(plain.alerts.cap_fractions, [0.5, 0.8, 1.0]);
    assert!(plain.alerts.webhook.is_none());
}

#[test]
fn vllm_sections_map_to_groups_with_defaults() {
    let c = load(
        Some(
            r#"
[node]
region = "eu-west"
[[vllm]]
id = "llama"
model = "meta-llama/Llama-3.1-8B-Instruct"
gpus = [0, 1, 2, 3]
tensor_parallel_size = 2
max_replicas = 2
max_num_seqs = 128
lora_modules = ["sql=/adapters/sql"]
[vllm.env]
HF_HOME = "/models"
"#,
        ),
        &env(&[]),
    )
    .expect("valid");
    assert!(c.providers.is_empty(), "a [[vllm]] section is enough");
    let g = &c.vllm[0];
    assert_eq!(g.served_names, ["meta-llama/Llama-3.1-8B-Instruct"]);
    assert_eq!(g.command, ["vllm"]);
    assert_eq!((g.gpus_per_replica, g.tensor_parallel_size), (2, 2));
    assert_eq!((g.min_replicas, g.max_replicas), (1, 2));
    assert_eq!(g.ports, (8100, 8101));
    assert_eq!(g.max_concurrency, 128);
    assert_eq!(g.region, "eu-west");
    assert_eq!(g.restart.max_restarts, 3);
    assert_eq!(g.autoscale.target_in_flight, 32);
    assert_eq!(g.lora_modules[0].name, "sql");
    assert_eq!(g.env, [("HF_HOME".to_owned(), "/models".to_owned())]);
    assert_eq!(c.nvidia_smi, "nvidia-smi");
}

#[test]
fn invalid_vllm_combinations_name_the_field() {
    let err = load(
        Some(
            r#"
[http]
listen = "127.0.0.1:8101"
[[vllm]]
id = "a"
model = "m"
gpus = [0, 1]
gpus_per_replica = 1
tensor_parallel_size = 2
max_replicas = 2
[[vllm]]
id = "b"
model = "m2"
gpus = [1, 2, 2]
port = 8100
min_replicas = 3
max_replicas = 2
gpu_memory_utilization = 1.5
lora_modules = ["no-path"]
[[vllm]]
model = "m3"
tensor_parallel_size = 2
"#,
        ),
        &env(&[]),
    )
    .expect_err("invalid");
    let p = paths(&err);
    for expected in [
        "vllm[0].tensor_parallel_size", // 2 > the 1 GPU a replica gets
        "vllm[0].port",                 // 8101 is http.listen's
        "vllm[1].gpus[2]",              // GPU 2 twice
        "vllm[1].gpus",                 // GPU 1 is group a's
        "vllm[1].max_replicas",         // below min_replicas
        "vllm[1].min_replicas",         // 3 × 1 GPU > 2 GPUs
        "vllm[1].port",                 // overlaps group a's ports
        "vllm[1].gpu_memory_utilization",
        "vllm[1].lora_modules[0]",
        "vllm[2].id",
        "vllm[2].tensor_parallel_size", // no GPUs at all
    ] {
        assert!(p.contains(&expected), "{expected} missing from {p:?}");
    }
    let text = err.to_string();
    assert!(text.contains("GPU 1 is already given"), "{text}");
    assert!(text.contains("already used by http.listen"), "{text}");
}

#[test]
fn admin_tls_settings_are_checked_field_by_field() {
    let with = |admin: &str| {
        let text = format!(
            "[admin]\n{admin}\n[[providers]]\nid = \"d\"\nkind = \"demo\"\nmodels = [\"demo\"]\n"
        );
        load(Some(&text), &env(&[])).expect_err("invalid")
    };
    let err = with("tls_from_cluster = true");
    assert_eq!(paths(&err), ["admin.tls_from_cluster"], "needs [cluster]");
    let err = with("tls_from_cluster = true\ntls_cert = \"a\"\ntls_key = \"b\"");
    assert_eq!(paths(&err), ["admin.tls_from_cluster"], "one or the other");
    let err = with("tls_key = \"b\"");
    assert_eq!(paths(&err), ["admin.tls_cert"]);
    let err = with("tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"");
    assert_eq!(
        paths(&err),
        ["admin.tls_cert", "admin.tls_key"],
        "unreadable files"
    );
}
