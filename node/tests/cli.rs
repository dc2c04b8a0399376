//! The `meridian` binary as a process: readiness line, SIGTERM → drained exit 0, and
//! `check-config` failing with the field path.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

mod common;

use common::BIN;

/// `meridian serve` on the embedded default, on ports picked by the OS, with `data` as its
/// data directory.
fn serve_default(data: &Path) -> common::Started {
    common::start(
        Command::new(BIN)
            .arg("serve")
            .env("MERIDIAN_NODE__DATA_DIR", data)
            .env("MERIDIAN_HTTP__LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_GRPC__LISTEN", "127.0.0.1:0")
            .env("MERIDIAN_ADMIN__LISTEN", "127.0.0.1:0")
            .env_remove("OPENAI_API_KEY"),
    )
}

/// `meridian serve --config FILE` with `env` set.
fn serve_file(file: &Path, env: &[(&str, &str)]) -> common::Started {
    common::start(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(file)
            .envs(env.iter().copied())
            .env_remove("OPENAI_API_KEY"),
    )
}

/// A node's configuration: node 1 with its data in `dir`'s `data`, each listener on a port the
/// OS picks, then `rest` (more of the `[admin]` section, then the other sections).
fn node_toml(dir: &Path, rest: &str) -> String {
    format!(
        "[node]\nid = 1\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\n\
         listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{rest}",
        dir.join("data")
    )
}

/// Writes `text` to file `name` in `dir`; the file's path.
fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// `meridian check-config FILE` with `env` set.
fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .arg("check-config")
        .arg(file)
        .envs(env.iter().copied())
        .output()
        .expect("check-config")
}

/// `meridian admin --addr ADDR` with `args` (credentials, options, then the command).
fn admin(addr: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["admin", "--addr", addr])
        .args(args)
        .env_remove("MERIDIAN_ADMIN_TOKEN")
        .output()
        .expect("admin cli")
}

/// What a command wrote to standard error.
fn stderr(out: &Output) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&out.stderr)
}

/// Asserts that a command succeeded, showing what it wrote to standard error if not.
fn assert_succeeded(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// Sends `signal` (`TERM`, `INT`, `HUP`) to `child`.
fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal}");
}

/// How `child` exited; it must have by `deadline` (`late` says what failed if not).
fn exit_by(child: &mut Child, deadline: Instant, late: &str) -> ExitStatus {
    loop {
        if let Some(code) = child.try_wait().expect("wait") {
            return code;
        }
        assert!(Instant::now() < deadline, "{late}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends the whole HTTP/1.1 request `request` to `addr`; the whole answer as text.
fn exchange(addr: impl ToSocketAddrs, request: &str) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.write_all(request.as_bytes()).expect("write");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("read");
    resp
}

/// A chat request with `body` and the extra `headers` (each ending in CRLF) to the node at
/// `addr`, whole answer as text.
fn post_with(addr: impl ToSocketAddrs, headers: &str, body: &str) -> String {
    exchange(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn serve_answers_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let started = serve_default(data.path());
    let http = started.addr("http");
    let admin_addr = format!("http://{}", started.addr("admin"));
    // First start: an admin token (saved, owner-only) and a development API key, shown once.
    let key = started.dev_key().expect("a development key on first start");
    assert!(
        !started.preamble.iter().any(|l| l.contains(&key)),
        "standard output is a pipe here: the key is not printed, {:?}",
        started.preamble
    );
    assert!(
        started
            .preamble
            .iter()
            .any(|l| l.starts_with("admin token")),
        "{:?}",
        started.preamble
    );
    let token_file = data.path().join("admin.token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file)
            .expect("admin.token")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the admin token is readable by its owner only"
        );
    }
    let mut child = started.child;

    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#;
    let post = |auth: &str| post_with(&http, auth, body);
    let resp = post("");
    assert!(
        resp.starts_with("HTTP/1.1 401"),
        "auth is on by default: {resp}"
    );
    let resp = post(&format!("Authorization: Bearer {key}\r\n"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("built-in demo model"), "{resp}");

    // The admin CLI finds the token in the data directory.
    let token_file = token_file.to_str().expect("a UTF-8 path");
    let out = admin(&admin_addr, &["--token-file", token_file, "key", "list"]);
    assert_succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tenant dev"));

    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = exit_by(&mut child, deadline, "node did not exit after SIGTERM");
    assert!(code.success(), "exit status {code}");

    // A second start on the same data shows no secret again.
    let mut again = serve_default(data.path());
    assert_eq!(again.dev_key(), None);
    assert!(
        !again.preamble.iter().any(|l| l.starts_with("admin token")),
        "{:?}",
        again.preamble
    );
    let _ = again.child.kill();
    let _ = again.child.wait();
}

#[test]
fn check_config_reports_every_bad_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write_file(
        dir.path(),
        "bad.toml",
        "[http]\nlisten = \"nowhere\"\n[[providers]]\nid = \"x\"\nkind = \"openai\"\nbase_url = \"x\"\nmodels = []\n",
    );
    let out = check_config(&bad, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    for field in [
        "http.listen",
        "providers[0].base_url",
        "providers[0].models",
    ] {
        assert!(err.contains(field), "{field} missing from:\n{err}");
    }

    let good = write_file(
        dir.path(),
        "good.toml",
        "[[providers]]\nid = \"d\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
    );
    assert_succeeded(&check_config(&good, &[]));
}

#[test]
fn certs_init_and_issue_write_a_ca_and_node_certificates_and_keep_the_ca_key_apart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run")
    };
    let init = run(&["init"]);
    assert_succeeded(&init);
    let said = String::from_utf8_lossy(&init.stdout);
    assert!(
        said.contains("certs-ca.key") && said.contains("keep the CA key off them"),
        "{said}"
    );
    assert_succeeded(&run(&["issue", "1", "--host", "127.0.0.1"]));
    for f in ["ca.crt", "node-1.crt", "node-1.key"] {
        assert!(dir.join(f).exists(), "{f} written");
    }
    assert!(
        !dir.join("ca.key").exists() && tmp.path().join("certs-ca.key").exists(),
        "the CA key is beside the directory the nodes get, not in it"
    );
    // Asked to put it among the node files: refused.
    let inside = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(tmp.path().join("other"))
        .arg("--ca-key")
        .arg(tmp.path().join("other/ca.key"))
        .output()
        .expect("run");
    assert!(!inside.status.success());
    assert!(
        stderr(&inside).contains("outside the certs directory"),
        "{}",
        stderr(&inside)
    );
    let again = run(&["init"]);
    assert!(!again.status.success(), "init never overwrites the CA");
    assert!(stderr(&again).contains("already exists"));
}

/// Holds TCP port `port` on loopback for a server: bound without SO_REUSEADDR (so it fails
/// where anyone else holds it), then given SO_REUSEADDR, never listening; a server that binds
/// the port with SO_REUSEADDR (Tokio's listeners do) may listen on it beside this socket.
fn hold(port: u16) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    s.set_reuse_address(true)?;
    Ok(s)
}

/// `meridian dev cluster`: three nodes on loopback that agree on a leader, a key that every node
/// accepts, and Ctrl-C (SIGINT) stopping them all and exiting 0.
#[test]
fn dev_cluster_starts_three_nodes_that_serve_with_one_key_and_stops_on_ctrl_c() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    // A base whose ports are all below the system's range for ports it picks itself
    // (32768 on), so only an explicit bind can take one. The TCP ones (HTTP, gRPC, admin and
    // mesh of each node) are held for the test by sockets bound to them that never listen
    // (the nodes' listeners bind beside them with SO_REUSEADDR); the Raft (UDP) ones cannot be
    // held while a node binds them: no test binds a UDP port of its own below that range.
    let (base, _held) = (0..80u16)
        .map(|i| 20_000 + ((std::process::id() % 80) as u16 + i) % 80 * 150)
        .find_map(|base| {
            let held: std::io::Result<Vec<socket2::Socket>> = (1..=3u16)
                .flat_map(|n| [n, 100 + n, 200 + n, 301 + 2 * n])
                .map(|o| hold(base + o))
                .collect();
            Some((base, held.ok()?))
        })
        .expect("free ports");
    let mut child = Command::new(BIN)
        .args([
            "dev",
            "cluster",
            "--nodes",
            "3",
            "--port-base",
            &base.to_string(),
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("meridian dev cluster");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("a line");
        let done = line.starts_with("Ctrl-C");
        said.push(line);
        if done {
            break;
        }
    }
    assert!(
        said.first().is_some_and(|l| l.contains("3 node(s) up")),
        "{said:?}"
    );
    let key = said
        .iter()
        .find_map(|l| l.strip_prefix("API key (tenant dev): "))
        .expect("a key")
        .to_owned();
    assert!(
        said.iter().any(|l| l.starts_with("admin token: ")),
        "{said:?}"
    );
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#;
    let auth = format!("Authorization: Bearer {key}\r\n");
    for n in 1..=3u16 {
        let resp = post_with(("127.0.0.1", base + n), &auth, body);
        assert!(resp.starts_with("HTTP/1.1 200"), "node {n}: {resp}");
    }
    signal(&child, "INT");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = exit_by(&mut child, deadline, "dev cluster did not stop on SIGINT");
    assert!(code.success(), "exit status {code}");
    for n in 1..=3u16 {
        assert!(
            TcpStream::connect(("127.0.0.1", base + n)).is_err(),
            "node {n} still listens after the dev cluster stopped"
        );
    }
}

/// Hot reload on SIGHUP under streaming load: the provider serving the model is replaced by
/// another and a model is added; streams in flight run to their end, no request fails. A bad
/// file is refused with its field named, the running configuration stays, and the admin API's
/// reload says the same.
#[test]
fn sighup_reloads_providers_under_streaming_load_without_a_failed_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    let config = |providers: &str| {
        node_toml(
            dir.path(),
            &format!(
                "token_env = \"RELOAD_TEST_ADMIN_TOKEN\"\n[auth]\nenabled = false\n{providers}"
            ),
        )
    };
    let first =
        "[[providers]]\nid = \"one\"\nkind = \"demo\"\nmodels = [\"m\"]\nword_delay = \"30ms\"\n";
    std::fs::write(&file, config(first)).expect("write");
    let token = "reload-test-admin-token-0123456789";
    let started = serve_file(&file, &[("RELOAD_TEST_ADMIN_TOKEN", token)]);
    let http = started.addr("http");
    let admin_addr = format!("http://{}", started.addr("admin"));
    let mut child = started.child;
    let request = |model: &str, stream: bool| chat_at(&http, model, stream);
    let admin_cli = |command: &[&str]| admin(&admin_addr, &[&["--token", token], command].concat());
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        let http = http.clone();
        clients.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let resp = chat_at(&http, "m", true);
                if resp.starts_with("HTTP/1.1 200") && resp.contains("data: [DONE]") {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.lock().unwrap().push(resp);
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(800));
    // Provider `one` goes, `two` serves `m` now, and `three` brings model `n`.
    let second = "[[providers]]\nid = \"two\"\nkind = \"demo\"\nmodels = [\"m\"]\nword_delay = \"30ms\"\n\
                  [[providers]]\nid = \"three\"\nkind = \"demo\"\nmodels = [\"n\"]\n";
    std::fs::write(&file, config(second)).expect("write");
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !request("n", false).starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "model n never became available");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1_500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        served.load(Ordering::Relaxed) >= 6,
        "streams served: {served:?}"
    );
    let providers = admin_cli(&["providers"]);
    let listed = String::from_utf8_lossy(&providers.stdout);
    assert!(
        listed.contains("two") && listed.contains("three") && !listed.contains("one "),
        "{listed}"
    );
    // The replicated registry's record of this node's providers follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = admin_cli(&["cluster", "state", "providers"]);
        let records = String::from_utf8_lossy(&state.stdout);
        if records.contains("\"1/two\"")
            && records.contains("\"1/three\"")
            && !records.contains("\"1/one\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the registry never followed the reload: {records}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A bad file: refused, naming the field; the running providers stay.
    std::fs::write(
        &file,
        config("[[providers]]\nid = \"bad\"\nkind = \"nonsense\"\nmodels = [\"m\"]\n"),
    )
    .expect("write");
    let reload = admin_cli(&["reload"]);
    let said = stderr(&reload);
    assert!(!reload.status.success(), "a bad file is refused");
    assert!(said.contains("providers[0].kind"), "{said}");
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        request("m", false).starts_with("HTTP/1.1 200"),
        "the running config stays"
    );

    // Prices and virtual models are applied at once.
    let priced = format!(
        "{second}[[aliases]]\nname = \"auto\"\ntrivial = [\"n\"]\nmoderate = [\"n\"]\nhard = [\"m\"]\n\
         [[prices]]\nmodel = \"n\"\ninput_usd_per_mtok = 1000.0\noutput_usd_per_mtok = 1000.0\n"
    );
    assert!(
        !chat_at(&http, "auto", false).starts_with("HTTP/1.1 200"),
        "no alias yet"
    );
    std::fs::write(&file, config(&priced)).expect("write");
    let reload = admin_cli(&["reload"]);
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(
        said.contains("prices applied") && said.contains("aliases applied"),
        "{said}{}",
        stderr(&reload)
    );
    assert!(
        chat_at(&http, "auto", false).starts_with("HTTP/1.1 200"),
        "the alias serves"
    );
    let body = r#"{"model":"n","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post_with(&http, "X-Meridian-Cost: on\r\n", body);
    let cost = resp
        .lines()
        .find_map(|l| l.strip_prefix("x-meridian-cost-usd: "))
        .and_then(|c| c.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(cost > 0.0, "billed at the new price: {resp}");

    // Request limits and quota settings are applied at once; the quota's static share is
    // named as taking a restart.
    let two_messages = r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
    let served = post_at(&http, two_messages);
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let limited = format!(
        "{priced}[limits]\nmax_messages = 1\n[quota]\ngrant_wait = \"2s\"\nstatic_share = 0.25\n"
    );
    std::fs::write(&file, config(&limited)).expect("write");
    let reload = admin_cli(&["reload"]);
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(
        said.contains("request limits applied")
            && said.contains("quota settings applied")
            && said.contains("applied only at the next restart: quota.static_share"),
        "{said}{}",
        stderr(&reload)
    );
    let refused = post_at(&http, two_messages);
    assert!(
        refused.starts_with("HTTP/1.1 400") && refused.contains("\"param\":\"messages\""),
        "{refused}"
    );

    // A change that takes a restart is named, not applied.
    std::fs::write(
        &file,
        config(&limited).replace("[auth]\nenabled = false", "[auth]\nenabled = true"),
    )
    .expect("write");
    let reload = admin_cli(&["reload"]);
    let said = String::from_utf8_lossy(&reload.stdout);
    assert_succeeded(&reload);
    assert!(
        said.contains("applied only at the next restart: auth"),
        "{said}"
    );
    assert!(
        !said.contains("quota settings applied") && !said.contains("limits applied"),
        "what was applied is not applied again: {said}"
    );
    assert!(
        request("m", false).starts_with("HTTP/1.1 200"),
        "auth still off until a restart"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A chat request for `model` to the node at `addr` (no credentials), whole answer as text.
fn chat_at(addr: &str, model: &str, stream: bool) -> String {
    post_at(
        addr,
        &format!(
            r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        ),
    )
}

/// A chat request with `body` to the node at `addr` (no credentials), whole answer as text.
fn post_at(addr: &str, body: &str) -> String {
    post_with(addr, "", body)
}

/// A stop as a balancer sees it, timed: at SIGTERM `/readyz` turns 503 `stopping` while
/// requests are still served for `unready_period`; then the drain refuses new requests (503
/// `node_draining`), lets a stream run on, and cuts it at `drain_timeout` (an error event, no
/// `[DONE]`); the node exits soon after.
#[test]
fn a_stop_turns_not_ready_first_then_drains_and_cuts_what_outlives_the_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = node_toml(
        dir.path(),
        "[auth]\nenabled = false\n[shutdown]\nunready_period = \"1500ms\"\n\
         drain_timeout = \"1s\"\n[[providers]]\nid = \"demo\"\nkind = \"demo\"\n\
         models = [\"demo\"]\nword_delay = \"200ms\"\n",
    );
    let file = write_file(dir.path(), "node.toml", &config);
    let started = serve_file(&file, &[]);
    let http = started.addr("http");
    let mut child = started.child;
    let get = |path: &str| {
        exchange(
            &http,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    };
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    // A long stream: the demo model's two dozen words, one every 200 ms.
    let long = {
        let http = http.clone();
        std::thread::spawn(move || {
            let text = post_at(
                &http,
                r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            );
            (text, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let term = Instant::now();
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    let ready = get("/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("\"status\":\"stopping\""),
        "{ready}"
    );
    let served = chat_at(&http, "demo", false);
    assert!(
        served.starts_with("HTTP/1.1 200"),
        "still served while out of rotation: {served}"
    );
    assert!(term.elapsed() < Duration::from_millis(1500));
    // Past the unready period: draining.
    std::thread::sleep(Duration::from_millis(1500) - term.elapsed() + Duration::from_millis(200));
    let refused = TcpStream::connect(&http).map(|_| ());
    assert!(
        refused.is_err(),
        "the listener is closed once the drain begins"
    );
    let (stream, ended) = long.join().expect("stream");
    assert!(
        stream.contains("\"error\"") && !stream.contains("data: [DONE]"),
        "cut at the drain timeout with an error event: {}",
        &stream[stream.len().saturating_sub(400)..]
    );
    // The drain begins 1.5 s after SIGTERM and lasts its 1 s timeout: the stream is cut then,
    // not before, and within 3 × the timeout.
    let cut = ended.duration_since(term);
    assert!(
        (Duration::from_millis(2_400)..Duration::from_millis(4_500)).contains(&cut),
        "the stream was cut {cut:?} after SIGTERM"
    );
    let deadline = term + Duration::from_secs(6);
    let exited = exit_by(&mut child, deadline, "not exited 6 s after SIGTERM");
    println!(
        "stop: not ready at once, drain from 1.5 s, stream cut and exit ({exited}) after {:?}",
        term.elapsed()
    );
}

/// The admin API over TLS: with certificate files, the CLI verifying them against the CA that
/// signed them; a plain-text client gets nothing, a CLI without the CA is told what it needs,
/// and a bad TLS setting is refused naming its field.
#[test]
fn the_admin_api_serves_tls_and_the_cli_verifies_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let ca_key = dir.path().join("ca.key");
    meridian_cluster::certs::init_ca(&certs, &ca_key).expect("ca");
    meridian_cluster::certs::issue(&certs, &ca_key, 1, &["127.0.0.1".into()]).expect("cert");
    let file = dir.path().join("node.toml");
    let config = |admin_tls: &str| {
        node_toml(
            dir.path(),
            &format!(
                "token_env = \"TLS_TEST_ADMIN_TOKEN\"\n{admin_tls}\n[auth]\nenabled = false\n\
                 [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n"
            ),
        )
    };
    let token = "tls-test-admin-token-0123456789abcdef";
    let env = [("TLS_TEST_ADMIN_TOKEN", token)];
    // Half a setting: refused, naming the field.
    std::fs::write(
        &file,
        config(&format!("tls_cert = {:?}", certs.join("node-1.crt"))),
    )
    .expect("write");
    let out = check_config(&file, &env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admin.tls_key"), "{}", stderr(&out));
    std::fs::write(
        &file,
        config(&format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            certs.join("node-1.crt"),
            certs.join("node-1.key")
        )),
    )
    .expect("write");
    let started = serve_file(&file, &env);
    let admin_addr = started.addr("admin");
    let mut child = started.child;
    let cli = |addr: String, extra: &[&str]| {
        admin(&addr, &[&["--token", token], extra, &["status"]].concat())
    };
    let ca = certs.join("ca.crt");
    let ca = ca.to_str().expect("a UTF-8 path");
    let ok = cli(format!("https://{admin_addr}"), &["--ca-cert", ca]);
    assert_succeeded(&ok);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("node 1"));
    let plain = cli(format!("http://{admin_addr}"), &[]);
    assert!(!plain.status.success(), "plain text is not served");
    let unverified = cli(format!("https://{admin_addr}"), &[]);
    assert!(!unverified.status.success());
    assert!(
        stderr(&unverified).contains("--ca-cert"),
        "{}",
        stderr(&unverified)
    );
    let _ = child.kill();
    let _ = child.wait();
}
