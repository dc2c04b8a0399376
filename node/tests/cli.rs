//! The `meridian` binary as a process: readiness line, SIGTERM → drained exit 0, and
//! `check-config` failing with the field path.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::BIN;

/// `meridian serve` on the embedded default, on ports picked by the OS, with `data` as its
/// data directory.
fn serve_default(data: &std::path::Path) -> common::Started {
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

#[test]
fn serve_answers_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let started = serve_default(data.path());
    let http = started.addr("http");
    let admin = format!("http://{}", started.addr("admin"));
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
    let post = |auth: &str| {
        let mut conn = TcpStream::connect(&http).expect("connect");
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("read");
        resp
    };
    let resp = post("");
    assert!(
        resp.starts_with("HTTP/1.1 401"),
        "auth is on by default: {resp}"
    );
    let resp = post(&format!("Authorization: Bearer {key}\r\n"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("built-in demo model"), "{resp}");

    // The admin CLI finds the token in the data directory.
    let out = Command::new(BIN)
        .args(["admin", "--addr", &admin])
        .arg("--token-file")
        .arg(&token_file)
        .args(["key", "list"])
        .env_remove("MERIDIAN_ADMIN_TOKEN")
        .output()
        .expect("admin cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tenant dev"));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = child.try_wait().expect("wait") {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

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
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = \"nowhere\"\n[[providers]]\nid = \"x\"\nkind = \"openai\"\nbase_url = \"x\"\nmodels = []\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "http.listen",
        "providers[0].base_url",
        "providers[0].models",
    ] {
        assert!(err.contains(field), "{field} missing from:\n{err}");
    }

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[providers]]\nid = \"d\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(init.status.success());
    let said = String::from_utf8_lossy(&init.stdout);
    assert!(
        said.contains("certs-ca.key") && said.contains("keep the CA key off them"),
        "{said}"
    );
    assert!(run(&["issue", "1", "--host", "127.0.0.1"]).status.success());
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
        String::from_utf8_lossy(&inside.stderr).contains("outside the certs directory"),
        "{}",
        String::from_utf8_lossy(&inside.stderr)
    );
    let again = run(&["init"]);
    assert!(!again.status.success(), "init never overwrites the CA");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
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
    for n in 1..=3u16 {
        let mut conn = TcpStream::connect(("127.0.0.1", base + n)).expect("connect");
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("read");
        assert!(resp.starts_with("HTTP/1.1 200"), "node {n}: {resp}");
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = child.try_wait().expect("wait") {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dev cluster did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
        format!(
            "[node]\nid = 1\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\n\
             listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             token_env = \"RELOAD_TEST_ADMIN_TOKEN\"\n[auth]\nenabled = false\n{providers}",
            dir.path().join("data")
        )
    };
    let first =
        "[[providers]]\nid = \"one\"\nkind = \"demo\"\nmodels = [\"m\"]\nword_delay = \"30ms\"\n";
    std::fs::write(&file, config(first)).expect("write");
    let started = common::start(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&file)
            .env(
                "RELOAD_TEST_ADMIN_TOKEN",
                "reload-test-admin-token-0123456789",
            )
            .env_remove("OPENAI_API_KEY"),
    );
    let http = started.addr("http");
    let admin = format!("http://{}", started.addr("admin"));
    let mut child = started.child;
    let request = |model: &str, stream: bool| chat_at(&http, model, stream);
    let admin_cli = |command: &str| {
        Command::new(BIN)
            .args(["admin", "--addr", &admin, "--token"])
            .args(["reload-test-admin-token-0123456789", command])
            .output()
            .expect("admin cli")
    };
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
    let hup = |child: &std::process::Child| {
        let ok = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    hup(&child);
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
    let providers = admin_cli("providers");
    let listed = String::from_utf8_lossy(&providers.stdout);
    assert!(
        listed.contains("two") && listed.contains("three") && !listed.contains("one "),
        "{listed}"
    );
    // The replicated registry's record of this node's providers follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = Command::new(BIN)
            .args(["admin", "--addr", &admin, "--token"])
            .args([
                "reload-test-admin-token-0123456789",
                "cluster",
                "state",
                "providers",
            ])
            .output()
            .expect("admin cli");
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
    let reload = admin_cli("reload");
    let said = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success(), "a bad file is refused");
    assert!(said.contains("providers[0].kind"), "{said}");
    hup(&child);
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
    let reload = admin_cli("reload");
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(
        said.contains("prices applied") && said.contains("aliases applied"),
        "{said}{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert!(
        chat_at(&http, "auto", false).starts_with("HTTP/1.1 200"),
        "the alias serves"
    );
    let body = r#"{"model":"n","messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = TcpStream::connect(&http).expect("connect");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Meridian-Cost: on\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("read");
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
    let reload = admin_cli("reload");
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(
        said.contains("request limits applied")
            && said.contains("quota settings applied")
            && said.contains("applied only at the next restart: quota.static_share"),
        "{said}{}",
        String::from_utf8_lossy(&reload.stderr)
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
    let reload = admin_cli("reload");
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
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
    let mut conn = TcpStream::connect(addr).expect("connect");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("read");
    resp
}

/// A stop as a balancer sees it, timed: at SIGTERM `/readyz` turns 503 `stopping` while
/// requests are still served for `unready_period`; then the drain refuses new requests (503
/// `node_draining`), lets a stream run on, and cuts it at `drain_timeout` (an error event, no
/// `[DONE]`); the node exits soon after.
#[test]
fn a_stop_turns_not_ready_first_then_drains_and_cuts_what_outlives_the_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nid = 1\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\n\
             listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\n\
             enabled = false\n[shutdown]\nunready_period = \"1500ms\"\ndrain_timeout = \"1s\"\n\
             [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n\
             word_delay = \"200ms\"\n",
            dir.path().join("data")
        ),
    )
    .expect("write");
    let started = common::start(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&file)
            .env_remove("OPENAI_API_KEY"),
    );
    let http = started.addr("http");
    let mut child = started.child;
    let get = |path: &str| {
        let mut conn = TcpStream::connect(&http).expect("connect");
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("read");
        resp
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
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
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
    let exited = loop {
        if let Some(code) = child.try_wait().expect("wait") {
            break code;
        }
        assert!(Instant::now() < deadline, "not exited 6 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
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
        format!(
            "[node]\nid = 1\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\n\
             listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             token_env = \"TLS_TEST_ADMIN_TOKEN\"\n{admin_tls}\n[auth]\nenabled = false\n\
             [[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n",
            dir.path().join("data")
        )
    };
    // Half a setting: refused, naming the field.
    std::fs::write(
        &file,
        config(&format!("tls_cert = {:?}", certs.join("node-1.crt"))),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(&file)
        .env(
            "TLS_TEST_ADMIN_TOKEN",
            "tls-test-admin-token-0123456789abcdef",
        )
        .output()
        .expect("check-config");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin.tls_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &file,
        config(&format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            certs.join("node-1.crt"),
            certs.join("node-1.key")
        )),
    )
    .expect("write");
    let started = common::start(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&file)
            .env(
                "TLS_TEST_ADMIN_TOKEN",
                "tls-test-admin-token-0123456789abcdef",
            )
            .env_remove("OPENAI_API_KEY"),
    );
    let admin = started.addr("admin");
    let mut child = started.child;
    let cli = |addr: String, extra: &[&std::ffi::OsStr]| {
        Command::new(BIN)
            .args(["admin", "--addr", &addr])
            .args(["--token", "tls-test-admin-token-0123456789abcdef"])
            .args(extra)
            .arg("status")
            .output()
            .expect("admin cli")
    };
    let ca = certs.join("ca.crt");
    let ok = cli(
        format!("https://{admin}"),
        &["--ca-cert".as_ref(), ca.as_os_str()],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("node 1"));
    let plain = cli(format!("http://{admin}"), &[]);
    assert!(!plain.status.success(), "plain text is not served");
    let unverified = cli(format!("https://{admin}"), &[]);
    assert!(!unverified.status.success());
    assert!(
        String::from_utf8_lossy(&unverified.stderr).contains("--ca-cert"),
        "{}",
        String::from_utf8_lossy(&unverified.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
}
