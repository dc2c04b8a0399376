//! Every example configuration in `deploy/` validates (what `meridian check-config` checks).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::Path;

#[test]
fn deploy_examples_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let env = vec![
        ("OPENAI_API_KEY".to_owned(), "sk-example".to_owned()),
        ("ANTHROPIC_API_KEY".to_owned(), "sk-ant-example".to_owned()),
    ];
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            if let Err(e) = meridian_node::config::load(Some(&text), &env) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no example configuration found in {}",
        dir.display()
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
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let prometheus = deploy.join("prometheus");
    promtool(&["check", "rules", "alerts.yml"], &prometheus);
    promtool(&["test", "rules", "alerts.test.yml"], &prometheus);

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/meridian.json")).expect("the dashboard"),
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
