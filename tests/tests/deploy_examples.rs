//! Every example configuration in `deploy/` validates (what `meridian check-config` checks).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `path` in the workspace's `deploy/` folder.
fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// `python -c script args…`, run to its end.
fn python_c(python: &Path, script: &str, args: &[&Path]) -> Output {
    Command::new(python)
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python runs")
}

/// What a command printed: its standard output, then its standard error.
fn printed(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn deploy_examples_validate() {
    let dir = deploy("");
    // Multi-node examples name their certificates' folder: one made here stands in.
    let certs = tempfile::tempdir().expect("tempdir");
    meridian_cluster::certs::init_ca(certs.path(), &certs.path().join("issuer/ca.key"))
        .expect("ca");
    meridian_cluster::certs::issue(certs.path(), &certs.path().join("issuer/ca.key"), 1, &[])
        .expect("cert");
    let env = vec![
        ("OPENAI_API_KEY".to_owned(), "sk-example".to_owned()),
        ("ANTHROPIC_API_KEY".to_owned(), "sk-ant-example".to_owned()),
        (
            "MERIDIAN_ADMIN_TOKEN".to_owned(),
            "an-example-admin-token-0123456789abcdef".to_owned(),
        ),
        (
            "MERIDIAN_CLUSTER__CERTS_DIR".to_owned(),
            certs.path().display().to_string(),
        ),
    ];
    let mut checked = Vec::new();
    let mut folders = vec![dir.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("readable folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("readable");
                if let Err(e) = meridian_node::config::load(Some(&text), &env) {
                    panic!("{}: {e}", path.display());
                }
                checked.push(path);
            }
        }
    }
    assert!(
        checked.iter().any(|p| p.ends_with("systemd/node.toml")),
        "the systemd example was not found in {}: {checked:?}",
        dir.display()
    );
}

/// The systemd unit passes `systemd-analyze verify` with nothing to say (an unknown key or a
/// bad value is a warning there, and fails this test), its binary put where the test built it.
#[test]
fn the_systemd_unit_verifies_clean() {
    let unit = deploy("systemd/meridian.service");
    let text = std::fs::read_to_string(&unit).expect("the unit");
    assert!(
        text.contains("ExecStart=/usr/local/bin/meridian serve"),
        "{text}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = meridian_tests::procs::meridian_bin();
    let copy = dir.path().join("meridian.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/meridian", bin.to_str().expect("utf-8 path")),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs (Debian's systemd package)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
}

/// `promtool args…` in `dir`; fails the test with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path) {
    meridian_tests::run_tool("promtool", "prometheus", args, Some(dir), None);
}

/// The metric names an expression reads (Meridian's and the GenAI conventions' own).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if at_word_start && (rest.starts_with("meridian_") || rest.starts_with("gen_ai_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

/// The series names a node's Prometheus text exports: each family's name, and a histogram's
/// `_bucket`, `_sum` and `_count`.
fn exported(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        names.insert(name.to_owned());
        if kind == "histogram" {
            for part in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{part}"));
            }
        }
    }
    names
}

/// The alert rules pass `promtool check rules` and their unit tests; the Grafana dashboard's
/// every query parses (as a recording rule, with Grafana's variables put in), and every
/// metric either reads is one a live node exports.
#[tokio::test]
async fn dashboards_and_alert_rules_use_only_what_a_node_exports() {
    let prometheus = deploy("prometheus");
    promtool(&["check", "rules", "alerts.yml"], &prometheus);
    promtool(&["test", "rules", "alerts.test.yml"], &prometheus);

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/meridian.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs: Vec<String> = Vec::new();
    let mut uids = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} is not on the datasource variable",
            panel["title"]
        );
        assert!(
            uids.insert(panel["id"].to_string()),
            "two panels with id {}",
            panel["id"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            exprs.push(expr.replace("$__rate_interval", "5m"));
        }
    }
    assert!(exprs.len() >= 15, "only {} queries", exprs.len());
    let rules = format!(
        "groups:\n  - name: dashboard\n    rules:\n{}",
        exprs
            .iter()
            .enumerate()
            .map(|(i, e)| format!(
                "      - record: dashboard:query_{i}\n        expr: {}\n",
                serde_json::to_string(e).expect("a string")
            ))
            .collect::<String>()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("dashboard.yml"), rules).expect("write");
    promtool(&["check", "rules", "dashboard.yml"], tmp.path());

    // A node with every optional part on that these read (auth and quotas, the cache, the call
    // log) and one call through it.
    let node = meridian_tests::TestNode::start(
        "[cache]\nenabled = true\n[[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
    )
    .await
    .expect("node starts");
    let answer = node
        .post_chat(meridian_tests::chat_body("demo", false, ""))
        .await
        .expect("sent");
    assert_eq!(answer.status(), 200);
    let text = node.metrics().await;
    let exported = exported(&text);
    let alerts = std::fs::read_to_string(prometheus.join("alerts.yml")).expect("alerts.yml");
    let mut read: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    read.extend(metric_names(&alerts));
    assert!(read.len() > 20);
    let missing: Vec<&String> = read.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "read but not exported: {missing:?}\nexported: {exported:?}"
    );
}

/// The container image cannot be built here (no container daemon, no registry for base images),
/// so what can be checked without one is: two stages, the release build of the `meridian`
/// binary, a runtime stage with CA certificates that runs as a non-root numeric user, and
/// configuration overrides that a node accepts (loaded as the image would start it).
#[test]
fn the_dockerfile_builds_the_node_and_runs_it_as_a_non_root_user_with_a_valid_config() {
    let path = deploy("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    assert!(stages[0].ends_with(" AS build"), "{}", stages[0]);
    assert!(
        text.contains("cargo build --release --locked -p meridian-node --bin meridian"),
        "the release build of the node"
    );
    let runtime = text.split_once(stages[1]).expect("the runtime stage").1;
    assert!(
        runtime.contains("ca-certificates"),
        "CA certificates for HTTPS providers"
    );
    assert!(
        runtime.contains("COPY --from=build"),
        "only the binary comes from the build"
    );
    let user = runtime
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric user (Kubernetes' runAsNonRoot checks it)");
    assert_ne!(uid, 0, "not root");
    // The ENV instruction (continued over lines) sets configuration overrides a node accepts.
    let mut env_text = String::new();
    for line in runtime.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            env_text.push_str(rest);
        } else if !env_text.is_empty() {
            env_text.push(' ');
            env_text.push_str(line);
        }
        if !env_text.is_empty() && !line.ends_with('\\') {
            break;
        }
    }
    let env: Vec<(String, String)> = env_text
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(env.len() >= 3, "{env:?}");
    let config = meridian_node::config::load(None, &env).expect("the image's config is valid");
    assert_eq!(config.http.listen.to_string(), "0.0.0.0:8080");
}

/// The Python with `kubernetes-validate` (its schemas are in the package: no cluster and no
/// network needed), in a virtualenv under `target/` made on first use.
fn kubernetes_validate() -> PathBuf {
    meridian_tests::installs::python_venv(
        "k8s-venv",
        "kubernetes_validate, yaml",
        &["kubernetes-validate"],
    )
    .expect("kubernetes-validate")
}

/// The Kubernetes manifests validate against Kubernetes' own schemas (strict: no unknown
/// field; the KEDA and Prometheus Operator custom resources are parsed, their schemas are not
/// Kubernetes'), and a router's start script with the ConfigMap's `node.toml` gives a valid
/// configuration for each pod of the StatefulSet (its id, its peers by DNS name, itself left
/// out), checked by the node's own `check-config`.
#[test]
fn the_kubernetes_manifests_validate_and_every_router_pod_gets_a_valid_config() {
    let python = kubernetes_validate();
    let dir = deploy("kubernetes");
    let manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    assert!(manifests.len() >= 4, "{manifests:?}");
    let out = Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&manifests)
        .output()
        .expect("kubernetes-validate runs");
    let said = printed(&out);
    assert!(out.status.success(), "{said}");
    for line in said.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("ScaledObject")
                || line.contains("ServiceMonitor")
                || line.contains("PrometheusRule"),
            "only the custom resources go unchecked: {line}"
        );
    }
    // The PrometheusRule holds the alert rules promtool tests, unchanged.
    let same = "import sys, yaml\n\
        rule = yaml.safe_load(open(sys.argv[1]))\n\
        alerts = yaml.safe_load(open(sys.argv[2]))\n\
        sys.exit(0 if rule['spec']['groups'] == alerts['groups'] else 1)\n";
    let rules = dir.join("rules.yaml");
    let alerts = dir.join("../prometheus/alerts.yml");
    let out = python_c(&python, same, &[&rules, &alerts]);
    assert!(
        out.status.success(),
        "deploy/kubernetes/rules.yaml and deploy/prometheus/alerts.yml differ: {}",
        printed(&out)
    );
    assert!(said.contains("statefulset/meridian"), "{said}");

    // The ConfigMap's files, as a pod mounts them.
    let tmp = tempfile::tempdir().expect("tempdir");
    let extract = "import sys, yaml\n\
        cm = yaml.safe_load(open(sys.argv[1]))\n\
        for name, text in cm['data'].items():\n\
        \x20   open(sys.argv[2] + '/' + name, 'w').write(text)\n";
    let out = python_c(
        &python,
        extract,
        &[&dir.join("meridian-config.yaml"), tmp.path()],
    );
    assert!(out.status.success(), "{}", printed(&out));
    // A pod is given longer to stop than the node takes: out of rotation, then its drain.
    let grace = "import sys, re, tomllib, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
        pod = next(d for d in docs if d['kind'] == 'StatefulSet')['spec']['template']['spec']\n\
        stop = tomllib.load(open(sys.argv[2], 'rb'))['shutdown']\n\
        def secs(v):\n\
        \x20   n, unit = re.fullmatch(r'([0-9.]+)(ms|s|m)', v).groups()\n\
        \x20   return float(n) * {'ms': 0.001, 's': 1, 'm': 60}[unit]\n\
        need = secs(stop.get('unready_period', '0s')) + secs(stop['drain_timeout'])\n\
        print(pod['terminationGracePeriodSeconds'], need)\n\
        sys.exit(0 if pod['terminationGracePeriodSeconds'] > need else 1)\n";
    let out = python_c(
        &python,
        grace,
        &[&dir.join("meridian.yaml"), &tmp.path().join("node.toml")],
    );
    assert!(
        out.status.success(),
        "terminationGracePeriodSeconds is not longer than unready_period + drain_timeout: {}",
        printed(&out)
    );
    let certs = tmp.path().join("certs");
    meridian_cluster::certs::init_ca(&certs, &meridian_cluster::certs::ca_key_beside(&certs))
        .expect("ca");
    for id in 1..=3 {
        meridian_cluster::certs::issue(
            &certs,
            &meridian_cluster::certs::ca_key_beside(&certs),
            id,
            &[],
        )
        .expect("cert");
    }
    let script = std::fs::read_to_string(tmp.path().join("start.sh")).expect("start.sh");
    let exec = "exec /usr/local/bin/meridian serve --config /etc/meridian/node.toml";
    assert!(script.contains(exec), "{script}");
    let bin = meridian_tests::procs::meridian_bin();
    let checking = script.replace(
        exec,
        &format!(
            "exec {} check-config {}",
            bin.display(),
            tmp.path().join("node.toml").display()
        ),
    );
    std::fs::write(tmp.path().join("check.sh"), checking).expect("write");
    for ordinal in 0..3 {
        let out = Command::new("sh")
            .arg(tmp.path().join("check.sh"))
            .env("HOSTNAME", format!("meridian-{ordinal}"))
            .env("NAMESPACE", "meridian")
            .env("ROUTERS", "3")
            .env(
                "MERIDIAN_ADMIN_TOKEN",
                "a-kubernetes-secret-admin-token-0123456789",
            )
            .env("MERIDIAN_CLUSTER__CERTS_DIR", &certs)
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "pod meridian-{ordinal}: {}",
            printed(&out)
        );
    }
}

/// The compose file: each node's environment over the shared `node.toml` is a valid
/// configuration (checked by the node's `check-config`), its peers are the other services by
/// name, and every node is published on its own port. (`docker compose` itself is not on
/// these machines.)
#[test]
fn the_compose_files_nodes_each_get_a_valid_config_and_find_each_other_by_name() {
    let python = kubernetes_validate();
    let dir = deploy("compose");
    let dump = "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let out = python_c(&python, dump, &[&dir.join("compose.yaml")]);
    assert!(out.status.success(), "{}", printed(&out));
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let services = compose["services"].as_object().expect("services");
    let nodes: Vec<(&String, &serde_json::Value)> = services
        .iter()
        .filter(|(name, _)| name.starts_with("node"))
        .collect();
    assert_eq!(nodes.len(), 3);
    let certs = tempfile::tempdir().expect("tempdir");
    meridian_cluster::certs::init_ca(certs.path(), &certs.path().join("issuer/ca.key"))
        .expect("ca");
    let mut ports = std::collections::BTreeSet::new();
    for (name, service) in &nodes {
        let env = service["environment"].as_object().expect("environment");
        let id: u64 = env["MERIDIAN_NODE__ID"]
            .as_str()
            .expect("id")
            .parse()
            .expect("a number");
        meridian_cluster::certs::issue(certs.path(), &certs.path().join("issuer/ca.key"), id, &[])
            .expect("cert");
        assert_eq!(env["MERIDIAN_CLUSTER__ADVERTISE"], format!("{name}:7000"));
        let peers = env["MERIDIAN_CLUSTER__PEERS"].as_str().expect("peers");
        for (other, _) in nodes.iter().filter(|(o, _)| o != name) {
            assert!(peers.contains(&format!("@{other}:7000")), "{name}: {peers}");
        }
        assert!(ports.insert(service["ports"][0].as_str().expect("a port").to_owned()));
        let mut check = Command::new(meridian_tests::procs::meridian_bin());
        check
            .arg("check-config")
            .arg(dir.join("node.toml"))
            .env("MERIDIAN_CLUSTER__CERTS_DIR", certs.path());
        for (k, v) in env {
            check.env(k, v.as_str().expect("text"));
        }
        let out = check.output().expect("check-config runs");
        assert!(out.status.success(), "{name}: {}", printed(&out));
    }
}
