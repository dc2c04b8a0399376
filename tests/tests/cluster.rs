//! Real processes: `meridian` nodes on their own loopback addresses, each with its own data
//! directory and log, talking Raft over QUIC with mutual TLS (the harness: `meridian_tests::procs`).
//! Every test prints what it measured.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::{Duration, Instant};

use meridian_tests::limit;
use meridian_tests::procs::Harness;
use meridian_tests::serve::serve;
use meridian_tests::{ReservedPort, chat_as, metric, mock_vllm_stats, status_of};

const T: Duration = Duration::from_secs(30);

/// The harness's `election_timeout_max` (`meridian_tests::procs`).
const ELECTION_MAX: Duration = Duration::from_millis(600);
/// A failover's bound, for a new leader and for the gap in acknowledged writes: 4 election
/// timeouts (a follower notices the silence within one; each split vote takes another round,
/// and two in a row were seen on a loaded machine: 2.33 s), and the harness's polling and the
/// writers' retry on top.
const FAILOVER: Duration = ELECTION_MAX
    .saturating_mul(4)
    .saturating_add(Duration::from_millis(300));

#[tokio::test]
async fn three_nodes_form_replicate_fail_over_and_lose_nothing() {
    let mut h = Harness::new(11);
    let started = Instant::now();
    let leader = h.boot(&[1, 2, 3]).await;
    println!(
        "3 nodes formed: leader {leader} after {:?}",
        started.elapsed()
    );

    // A write on any node is visible on all.
    h.put_tier(1).await.unwrap();
    let mut names = Vec::new();
    let wrote = Instant::now();
    for id in [1, 2, 3] {
        let name = format!("via-{id}");
        h.put_tenant(id, &name).await.unwrap();
        names.push(name);
    }
    h.wait_replicated(&[1, 2, 3], &names, T).await;
    println!(
        "a write through each node is on all three after {:?}",
        wrote.elapsed()
    );

    // kill -9 the leader under a steady stream of writes.
    let writes = h.steady_writes(&[1, 2, 3], "w");
    writes.wait_more(20, T).await;
    let killed = Instant::now();
    h.kill(leader);
    let survivors: Vec<u64> = h.running();
    let new_leader = h.agreed_leader(&survivors, Some(leader), T).await;
    let elected = killed.elapsed();
    writes.wait_more(20, T).await;

    // The killed node restarts from its disk and catches up.
    let restarted = Instant::now();
    h.start(leader).await;
    let so_far: Vec<String> = names.clone();
    h.wait_replicated(&[leader], &so_far, T).await;
    writes.wait_more(20, T).await;
    let (acked, outage) = writes.finish(killed).await;
    h.wait_replicated(&[1, 2, 3], &acked, T).await;
    assert!(elected <= FAILOVER, "a new leader after {elected:?}");
    assert!(outage <= FAILOVER, "no write acknowledged for {outage:?}");
    println!(
        "kill -9 of leader {leader}: new leader {new_leader} after {elected:?}; longest gap between \
         acknowledged writes {outage:?}; node {leader} restarted and caught up after {:?}; {} \
         acknowledged writes, none lost",
        restarted.elapsed(),
        acked.len()
    );

    // kill -9 of every node at once, restart: nothing acknowledged is lost.
    let term_before = h.status(new_leader).await.unwrap().term;
    for id in [1, 2, 3] {
        h.kill(id);
    }
    let again = Instant::now();
    for id in [1, 2, 3] {
        h.start(id).await;
    }
    let leader_after = h.agreed_leader(&[1, 2, 3], None, T).await;
    h.wait_replicated(&[1, 2, 3], &acked, T).await;
    let term_after = h.status(leader_after).await.unwrap().term;
    assert!(
        term_after >= term_before,
        "term went back: {term_before} -> {term_after}"
    );
    println!(
        "kill -9 of all three, restart: leader {leader_after} and all {} acknowledged writes on \
         every node after {:?} (term {term_before} -> {term_after})",
        acked.len(),
        again.elapsed()
    );
}

#[tokio::test]
async fn five_nodes_survive_losing_two() {
    let mut h = Harness::new(12);
    let ids = [1, 2, 3, 4, 5];
    let leader = h.boot(&ids).await;
    h.put_tier(1).await.unwrap();
    let writes = h.steady_writes(&ids, "w");
    writes.wait_more(20, T).await;
    // Lose the leader and one more.
    let other = ids.iter().copied().find(|id| *id != leader).unwrap();
    let killed = Instant::now();
    h.kill(leader);
    h.kill(other);
    let survivors = h.running();
    assert_eq!(survivors.len(), 3);
    let new_leader = h.agreed_leader(&survivors, Some(leader), T).await;
    let elected = killed.elapsed();
    writes.wait_more(30, T).await;
    let (acked, outage) = writes.finish(killed).await;
    h.wait_replicated(&survivors, &acked, T).await;
    assert!(elected <= FAILOVER, "a new leader after {elected:?}");
    assert!(outage <= FAILOVER, "no write acknowledged for {outage:?}");
    println!(
        "5 nodes, kill -9 of {leader} (leader) and {other}: leader {new_leader} after {elected:?}; \
         longest write gap {outage:?}; {} acknowledged writes on all 3 survivors",
        acked.len()
    );
    // Both come back and catch up.
    h.start(leader).await;
    h.start(other).await;
    h.wait_replicated(&ids, &acked, T).await;
}

#[tokio::test]
async fn a_frozen_leader_is_replaced_and_rejoins_as_a_follower() {
    let mut h = Harness::new(13);
    let leader = h.boot(&[1, 2, 3]).await;
    h.put_tier(1).await.unwrap();
    let frozen = Instant::now();
    h.freeze(leader);
    let others = h.running();
    let new_leader = h.agreed_leader(&others, Some(leader), T).await;
    let elected = frozen.elapsed();
    assert!(elected <= FAILOVER, "a new leader after {elected:?}");
    h.put_tenant(others[0], "while-frozen").await.unwrap();
    h.thaw(leader);
    let thawed = Instant::now();
    // The old leader learns of the new term, follows, and gets the write it missed.
    let agreed = h.agreed_leader(&[1, 2, 3], None, T).await;
    assert_ne!(
        agreed, leader,
        "the thawed node must not take over again with stale state"
    );
    h.wait_replicated(&[leader], &["while-frozen".to_owned()], T)
        .await;
    println!(
        "SIGSTOP of leader {leader}: leader {new_leader} after {elected:?}; after SIGCONT it \
         follows {agreed} and caught up in {:?}",
        thawed.elapsed()
    );
}

#[tokio::test]
async fn a_node_joins_as_a_learner_is_promoted_and_removed_with_the_cli() {
    let mut h = Harness::new(14);
    let leader = h.boot(&[1, 2, 3]).await;
    h.put_tier(1).await.unwrap();
    h.put_tenant(1, "before-join").await.unwrap();

    h.configure(4, &[1, 2, 3], true);
    h.start(4).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let raft_addr = h.node(4).raft_addr();
    let out = h.cli(follower, &["cluster", "add-learner", "4", &raft_addr]);
    assert!(out.contains("node 4 added as a learner"), "{out}");
    h.wait_replicated(&[4], &["before-join".to_owned()], T)
        .await;
    let s = h.status(leader).await.unwrap();
    assert!(s.learners.contains(&4) && !s.voters.contains(&4), "{s:?}");

    let out = h.cli(follower, &["cluster", "promote", "4"]);
    assert!(out.contains("node 4 is a voter"), "{out}");
    h.wait_for("node 4 to vote, in every node's view", T, || async {
        for id in [1, 2, 3, 4] {
            if !h.status(id).await?.voters.contains(&4) {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Node 4 recorded itself in the member table; the status command shows it all.
    h.agreed_leader(&[1, 2, 3, 4], None, T).await;
    let out = h.cli(4, &["cluster", "status"]);
    assert!(out.contains("voters [1, 2, 3, 4]"), "{out}");
    assert!(out.contains("member 4"), "{out}");
    println!("{out}");

    let out = h.cli(4, &["cluster", "remove", "4"]);
    assert!(out.contains("node 4 removed"), "{out}");
    h.wait_for("node 4 to be gone from the others", T, || async {
        for id in [1, 2, 3] {
            let s = h.status(id).await?;
            if s.voters.contains(&4)
                || s.learners.contains(&4)
                || s.members.iter().any(|m| m.id == 4)
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    h.put_tenant(1, "after-remove").await.unwrap();
    h.wait_replicated(&[1, 2, 3], &["after-remove".to_owned()], T)
        .await;
}

#[tokio::test]
async fn actors_answer_across_nodes_over_the_authenticated_mesh() {
    let mut h = Harness::new(15);
    h.boot(&[1, 2, 3]).await;
    // Every node asks the others' agents through the mesh and gets their answers.
    let started = Instant::now();
    for id in [1, 2, 3] {
        let h = &h;
        h.wait_for(
            &format!("node {id} to hear from both peers"),
            T,
            || async move {
                let mut admin = h.admin(id).await?;
                let m = admin
                    .mesh_status(meridian_proto::pb::admin::MeshStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                let mut answered: Vec<u64> = m.peers.iter().map(|p| p.node_id).collect();
                answered.sort();
                let expected: Vec<u64> = [1, 2, 3].into_iter().filter(|p| *p != id).collect();
                (answered == expected
                    && m.peers
                        .iter()
                        .all(|p| p.providers.iter().any(|q| q.id == "demo")))
                .then_some(())
            },
        )
        .await;
    }
    // Each node's actors registered its providers in the replicated registry, through the
    // proposer they were given; every node reads all of them from its applied state.
    h.wait_for("every node's providers in every registry", T, || async {
        for id in [1, 2, 3] {
            let state = h.cli(id, &["cluster", "state"]);
            let state: serde_json::Value = serde_json::from_str(&state).ok()?;
            for owner in [1, 2, 3] {
                let record = &state["providers"][format!("{owner}/demo")];
                if record["owner"] != owner || record["models"][0] != "demo" {
                    return None;
                }
            }
        }
        Some(())
    })
    .await;
    let out = h.cli(2, &["cluster", "mesh"]);
    assert!(
        out.contains("node 1 region r1 answered via the mesh"),
        "{out}"
    );
    assert!(
        out.contains("node 3 region r1 answered via the mesh"),
        "{out}"
    );
    println!(
        "mesh: every node got answers from both peers' agents after {:?}\n{out}",
        started.elapsed()
    );

    // A node with a certificate from another CA is refused by the server's check of it: the
    // impostor trusts the cluster's CA (it accepts the server) and knows the cookie derived
    // from it, so nothing else stands in its way.
    let foreign = h.impostor_pki(9);
    refused_on_the_mesh(&h, foreign.path(), 9, "127.0.15.9:0", "the impostor").await;

    // A certificate of the cluster's own CA for a node that is not a member (a removed one's,
    // say) is refused the same way.
    let stranger_pki = tempfile::tempdir().unwrap();
    std::fs::copy(h.pki().join("ca.crt"), stranger_pki.path().join("ca.crt")).unwrap();
    meridian_cluster::certs::issue(stranger_pki.path(), &h.ca_key(), 9, &[]).unwrap();
    refused_on_the_mesh(
        &h,
        stranger_pki.path(),
        9,
        "127.0.15.10:0",
        "a non-member with a cluster certificate",
    )
    .await;

    // A member's own certificate naming itself another member (one that is down, so nothing
    // else stands in the way of a session under its name) is refused too.
    h.kill(3);
    let posing = tempfile::tempdir().unwrap();
    std::fs::copy(h.pki().join("ca.crt"), posing.path().join("ca.crt")).unwrap();
    for ext in ["crt", "key"] {
        std::fs::copy(
            h.pki().join(format!("node-2.{ext}")),
            posing.path().join(format!("node-3.{ext}")),
        )
        .unwrap();
    }
    refused_on_the_mesh(
        &h,
        posing.path(),
        3,
        "127.0.15.11:0",
        "node 2's certificate posing as node 3",
    )
    .await;
}

/// A mesh member as node `as_node` with the certificates in `pki` (its files named for that
/// node), listening on `listen`, dials node 1 of `h` with the cluster's cookie: no session
/// forms on either side.
async fn refused_on_the_mesh(
    h: &Harness,
    pki: &std::path::Path,
    as_node: u64,
    listen: &str,
    who: &str,
) {
    let (server_tls, client_tls) = meridian_cluster::certs::mtls_configs(pki, as_node).unwrap();
    let gateway =
        meridian_actors::Gateway::start(meridian_actors::GatewayConfig::standalone(Vec::new()))
            .await
            .unwrap();
    let intruder = meridian_actors::mesh::Mesh::start(
        meridian_actors::mesh::MeshConfig {
            node_id: as_node,
            region: "x".into(),
            listen: listen.parse().unwrap(),
            cookie: h.mesh_cookie(),
            server_tls,
            client_tls,
            // The intruder believes anyone: what is tested is node 1's refusal.
            vouch: std::sync::Arc::new(|_: &_, _| Ok(())),
        },
        gateway.registry().clone(),
    )
    .await
    .unwrap();
    let addr = h.node(1).mesh_addr();
    // Under TLS 1.3 the client's side of the handshake completes before the server has
    // checked the client's certificate, so the dial itself may succeed: what counts is that no
    // session forms on either side, given the time a real peer takes (milliseconds, above).
    let dialled = intruder
        .connect(1, addr, meridian_cluster::certs::server_name(1).unwrap())
        .await;
    println!("mesh: {who} dialled node 1: {dialled:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut admin = h.admin(1).await.unwrap();
    let m = admin
        .mesh_status(meridian_proto::pb::admin::MeshStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let name = format!("node-{as_node}@");
    assert!(
        !m.connected.iter().any(|c| c.starts_with(&name)),
        "{who}: {m:?}"
    );
    let seen = intruder.connected().await;
    assert!(seen.is_empty(), "{who} has a session: {seen:?}");
    intruder.stop();
}

#[tokio::test]
async fn a_key_revoked_through_one_node_is_refused_by_every_node_within_two_seconds() {
    use meridian_proto::pb::admin as pb;
    let mut h = Harness::new(17);
    boot_with_acme(&mut h).await;
    let mut admin = h.admin(1).await.unwrap();
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            tenant: "acme".into(),
            label: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let client = reqwest::Client::new();
    let status = |id: u64| {
        let body = r#"{"model":"demo","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
        status_of(chat_as(&client, &h.node(id).http(), &key.secret, body))
    };
    // The key works on every node once replicated.
    h.wait_each(&[1, 2, 3], "to take the key", T, |id| async move {
        status(id).await == 200
    })
    .await;
    let mut other = h.admin(2).await.unwrap();
    other
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap();
    let revoked = Instant::now();
    let slowest = h
        .all_within(
            &[1, 2, 3],
            "refuses the revoked key",
            revoked,
            Duration::from_secs(2),
            |id| async move { status(id).await == 401 },
        )
        .await;
    println!("revoked through node 2: refused by all three nodes within {slowest:?}");
}

#[tokio::test]
async fn a_breaker_tripped_on_one_node_is_open_on_every_node_within_half_a_second() {
    use meridian_proto::pb::admin as pb;
    use meridian_tests::mock::{Flavor, MockUpstream};
    use meridian_tests::provider_toml;
    use std::sync::atomic::Ordering::SeqCst;
    let mock = |_| async { MockUpstream::with_flavor(Flavor::Vllm).await.unwrap() };
    let (flaky, steady) = (mock(1).await, mock(2).await);
    let mut h = Harness::new(18);
    // Every node has both providers. `m` is healthy at both; `bad` fails at `flaky` (and falls
    // back to `steady`), so only the node that serves `bad` sees `flaky` fail.
    h.providers = format!(
        "[breaker]\nconsecutive_failures = 5\nopen_base = \"60s\"\n\n{}{}",
        provider_toml(
            "flaky",
            &flaky.base_url(),
            &["m=mock@tokens:2", "bad=mock@fail:500"],
            ""
        ),
        // In another region, so every node tries `flaky` (in its own) first.
        provider_toml(
            "steady",
            &steady.base_url(),
            &["m=mock@tokens:2", "bad=mock@tokens:2"],
            "region = \"elsewhere\""
        ),
    );
    boot_with_acme(&mut h).await;
    let key = h.api_key(1, "acme").await.unwrap();
    let client = reqwest::Client::new();
    let chat = |id: u64, model: &str| {
        let body = format!(
            r#"{{"model":"{model}","max_tokens":4,"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        status_of(chat_as(&client, &h.node(id).http(), &key, body))
    };
    h.wait_each(&[1, 2, 3], "to serve", T, |id| async move {
        chat(id, "m").await == 200
    })
    .await;
    // Node 1 sees `flaky` fail five times in a row (its clients are served by `steady`).
    let mut tripped = None;
    for _ in 0..5 {
        assert_eq!(chat(1, "bad").await, 200);
        tripped = Some(Instant::now());
    }
    let tripped = tripped.unwrap();
    let h = &h;
    let open_on = |id: u64| async move {
        let mut a = h.admin(id).await?;
        let l = a.list_breakers(pb::ListBreakersRequest {}).await.ok()?;
        l.into_inner()
            .breakers
            .iter()
            .any(|b| b.provider == "flaky" && b.state == "open")
            .then_some(())
    };
    // The README says milliseconds: half a second is ten heartbeats. Node 1 routes on the
    // replicated record too (it proposes the trip, it does not take it locally), so it is
    // waited for as well: as a follower it may apply the entry after the others.
    let slowest = h
        .all_within(
            &[1, 2, 3],
            "sees the breaker open",
            tripped,
            Duration::from_millis(500),
            |id| async move { open_on(id).await.is_some() },
        )
        .await;
    println!(
        "breaker tripped by node 1's failures: open on all three nodes within {slowest:?} of the last failure"
    );
    // From then on no node sends `flaky` anything, while everything is still served.
    let before = flaky.stats.requests.load(SeqCst);
    for _ in 0..10 {
        for id in [1, 2, 3] {
            assert_eq!(chat(id, "m").await, 200);
        }
    }
    assert_eq!(
        flaky.stats.requests.load(SeqCst),
        before,
        "no node routes to an open provider"
    );
    assert!(steady.stats.requests.load(SeqCst) >= 30);
}

#[tokio::test]
async fn an_eu_only_tenant_is_never_served_outside_the_eu_by_any_node() {
    use meridian_proto::pb::admin as pb;
    use meridian_tests::mock::{Flavor, MockUpstream};
    use meridian_tests::provider_toml;
    use std::sync::atomic::Ordering::SeqCst;
    let us = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    // The EU provider is down (nothing listens there); the US one is healthy and idle.
    let held = ReservedPort::new().unwrap();
    let dead = held.dead_url();
    let mut h = Harness::new(19);
    h.providers = format!(
        "{}{}",
        provider_toml("eu", &dead, &["m=mock@tokens:2"], "region = \"eu-west\""),
        provider_toml(
            "us",
            &us.base_url(),
            &["m=mock@tokens:2"],
            "region = \"us-east\""
        ),
    );
    h.boot(&[1, 2, 3]).await;
    h.put_tier(1).await.unwrap();
    // Tenants are written through node 1; every node enforces them from its applied state.
    let mut admin = h.admin(1).await.unwrap();
    let mut keys = Vec::new();
    for (id, regions) in [("eu-co", vec!["eu-west".to_owned()]), ("global", vec![])] {
        admin
            .put_tenant(pb::PutTenantRequest {
                tenant: Some(pb::Tenant {
                    id: id.into(),
                    tier: "free".into(),
                    regions,
                    ..pb::Tenant::default()
                }),
            })
            .await
            .unwrap();
        keys.push(
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    tenant: id.into(),
                    label: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .secret,
        );
    }
    let client = reqwest::Client::new();
    let chat = |id: u64, key: &str| {
        let body = r#"{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
        status_of(chat_as(&client, &h.node(id).http(), key, body))
    };
    // Wait until every node knows both tenants (the global one is served by the US).
    let global = &keys[1];
    h.wait_each(
        &[1, 2, 3],
        "to serve the global tenant",
        T,
        |id| async move { chat(id, global).await == 200 },
    )
    .await;
    let served_before = us.stats.requests.load(SeqCst);
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..10 {
        for id in [1, 2, 3] {
            *statuses.entry(chat(id, &keys[0]).await).or_insert(0) += 1;
        }
    }
    println!("EU-only tenant through three nodes with the EU down: {statuses:?}");
    assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), [503]);
    assert_eq!(
        us.stats.requests.load(SeqCst),
        served_before,
        "no node served the EU-only tenant from the US"
    );
}

/// Three nodes, node 1 with the `[[vllm]]` section `vllm` (the mock vLLM on `port`), and tenant
/// `acme` with an API key, which is returned.
async fn boot_with_replica(h: &mut Harness, port: u16, vllm: &str) -> String {
    h.extra.insert(1, replica_section(port, vllm));
    boot_with_acme(h).await;
    h.api_key(1, "acme").await.unwrap()
}

/// A `[[vllm]]` group of one mock-vllm replica on `port`, with `vllm` in its section.
fn replica_section(port: u16, vllm: &str) -> String {
    format!(
        "[[vllm]]\nid = \"llama\"\nmodel = \"meta-llama/Llama-3.1-8B-Instruct\"\n\
         served_model_names = [\"llama-8b\"]\ncommand = {:?}\nport = {port}\n\
         health_interval = \"100ms\"\n{vllm}",
        env!("CARGO_BIN_EXE_mock-vllm")
    )
}

/// Boots nodes 1, 2 and 3 and writes tenant `acme` (tier `free`) through node 1.
async fn boot_with_acme(h: &mut Harness) {
    h.boot(&[1, 2, 3]).await;
    h.put_tier(1).await.unwrap();
    h.put_tenant(1, "acme").await.unwrap();
}

#[tokio::test]
async fn a_replica_one_node_launches_is_routed_to_by_every_node() {
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut h = Harness::new(20);
    let key = boot_with_replica(
        &mut h,
        port,
        "advertise_host = \"127.0.0.1\"\nrestart_backoff = \"1s\"\n",
    )
    .await;
    let client = reqwest::Client::new();
    // The nodes' addresses (they stay across restarts).
    let http: Vec<String> = [1, 2, 3].iter().map(|id| h.node(*id).http()).collect();
    let chat = |id: u64| {
        let body =
            r#"{"model":"llama-8b","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
        status_of(chat_as(&client, &http[id as usize - 1], &key, body))
    };
    let mock_requests = || async move { mock_vllm_stats(port).await.ok()?["requests"].as_u64() };
    // Nodes 2 and 3 know the replica only from the registry, and call it directly.
    h.wait_each(&[1, 2, 3], "to route to the replica", T, |id| async move {
        chat(id).await == 200
    })
    .await;
    let before = mock_requests().await.unwrap();
    for id in [2, 3, 2, 3] {
        assert_eq!(chat(id).await, 200);
    }
    assert_eq!(
        mock_requests().await.unwrap(),
        before + 4,
        "served by the replica"
    );
    let list = h.cli(1, &["vllm", "list"]);
    let pid: u32 = list
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {list}"));
    // kill -9: node 1 deregisters it, and the other nodes stop routing to it once that commits.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    // Each look is bounded: a call routed there just as the replica died can wait for its
    // provider's first-byte timeout (seen once: 60 s), and is not what this measures.
    let gone = h
        .all_within(
            &[2, 3],
            "to stop routing there",
            killed,
            Duration::from_secs(2),
            |id| async move {
                tokio::time::timeout(Duration::from_millis(400), chat(id))
                    .await
                    .is_ok_and(|status| status == 404)
            },
        )
        .await;
    // Restarted after its 1 s backoff, registered again, routed to again by every node:
    // within 3 × the backoff of the kill.
    let back = h
        .all_within(
            &[2, 3],
            "to route to the restarted replica",
            killed,
            Duration::from_secs(3),
            |id| async move { chat(id).await == 200 },
        )
        .await;
    println!(
        "a replica on node 1 killed with -9: nodes 2 and 3 stopped routing to it within {} ms, \
         and routed to its restart {} ms after the kill (backoff 1 s)",
        gone.as_millis(),
        back.as_millis()
    );
    assert!(gone <= Duration::from_secs(2));
    // Node 1 itself killed with -9: its replica dies with it (parent-death signal). Restarted
    // without the [[vllm]] section, it removes the record it left, and nobody routes there.
    h.kill(1);
    h.wait_for(
        "the replica to die with its node (at once: the parent-death signal)",
        Duration::from_secs(1),
        || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        },
    )
    .await;
    h.extra.remove(&1);
    h.configure(1, &[1, 2, 3], false);
    h.start(1).await;
    let restarted = Instant::now();
    h.wait_each(&[2, 3], "to forget the dead replica", T, |id| async move {
        chat(id).await == 404
    })
    .await;
    println!(
        "node 1 killed with -9 and restarted without its [[vllm]] section: its replica died with \
         it and its stale registry record was gone {} ms after the restart",
        restarted.elapsed().as_millis()
    );
}

/// Reads an SSE response to its end: the `data:` payloads, in order.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The text the content deltas of `events` spell.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_replica_only_its_node_reaches_is_called_through_the_actor_mesh() {
    use futures::StreamExt;
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut h = Harness::new(21);
    // No advertise_host: node 1 publishes the replica as reachable through itself only.
    let key = boot_with_replica(
        &mut h,
        port,
        "[vllm.env]\nMOCK_VLLM_SCRIPT = \"tokens=30;itl_ms=20\"\n",
    )
    .await;
    let client = reqwest::Client::new();
    let http: Vec<String> = [1, 2, 3].iter().map(|id| h.node(*id).http()).collect();
    let post = |id: u64, stream: bool| {
        let body = if stream {
            r#"{"model":"llama-8b","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#
        } else {
            r#"{"model":"llama-8b","messages":[{"role":"user","content":"hi"}]}"#
        };
        chat_as(&client, &http[id as usize - 1], &key, body).send()
    };
    let mock_stats = || async move { mock_vllm_stats(port).await.ok() };
    h.wait_each(&[1, 2, 3], "to route to the replica", T, |id| async move {
        post(id, false).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let sent = |id: u64| {
        metric(
            &http[id as usize - 1],
            "meridian_mesh_calls_total{direction=\"sent\"}",
        )
    };
    let served = || metric(&http[0], "meridian_mesh_calls_total{direction=\"served\"}");
    let (sent_before, served_before) = (
        sent(2).await.unwrap() + sent(3).await.unwrap(),
        served().await.unwrap(),
    );
    assert_eq!(sent(1).await, Some(0.0), "node 1 calls its replica itself");
    assert!(sent_before >= 2.0 && served_before == sent_before);

    // Whole answers: the same through any node; nodes 2 and 3 go through node 1.
    let local: serde_json::Value = post(1, false).await.unwrap().json().await.unwrap();
    let requests_before = mock_stats().await.unwrap()["requests"].as_u64().unwrap();
    for id in [2, 3] {
        let r = post(id, false).await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"], local["choices"][0]["message"]);
        assert_eq!(v["usage"], local["usage"]);
        assert_eq!(v["usage"]["completion_tokens"], 30);
    }
    // Streams: every chunk arrives, in order, with the usage chunk and [DONE].
    let local_events = sse_events(post(1, true).await.unwrap()).await;
    for id in [2, 3] {
        let started = Instant::now();
        let r = post(id, true).await.unwrap();
        assert_eq!(r.status(), 200);
        let events = sse_events(r).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(streamed_text(&events), streamed_text(&local_events));
        assert_eq!(
            streamed_text(&events),
            local["choices"][0]["message"]["content"].as_str().unwrap()
        );
        let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 30, "{usage}");
        println!(
            "a 30-token stream (20 ms apart) through node {id} and the mesh: {} events in {} ms",
            events.len(),
            started.elapsed().as_millis()
        );
    }
    assert_eq!(
        mock_stats().await.unwrap()["requests"].as_u64().unwrap(),
        requests_before + 5,
        "each call reached the replica once"
    );
    assert_eq!(
        sent(2).await.unwrap() + sent(3).await.unwrap(),
        sent_before + 4.0
    );
    assert_eq!(served().await.unwrap(), served_before + 4.0);

    // A client that leaves mid-stream: node 1 drops the upstream call.
    let aborted_before = mock_stats().await.unwrap()["aborted"].as_u64().unwrap();
    let mut body = post(2, true).await.unwrap().bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let left = Instant::now();
    h.wait_for(
        "the replica to see the call cancelled",
        Duration::from_secs(1),
        || async {
            let aborted = mock_stats().await?["aborted"].as_u64()?;
            (aborted > aborted_before).then_some(())
        },
    )
    .await;
    println!(
        "a client that left a forwarded stream: the replica's call was closed {} ms later",
        left.elapsed().as_millis()
    );

    // Node 1 killed mid-stream: the stream through node 2 ends with an error event, at once.
    let resp = post(2, true).await.unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    h.kill(1);
    let killed = Instant::now();
    let mut rest = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(Ok(bytes)) = body.next().await {
            rest.push_str(&String::from_utf8_lossy(&bytes));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream hung after its owner died");
    assert!(rest.contains("\"error\""), "no error event: {rest}");
    let stream_end = killed.elapsed();
    // At once: the owner's connection closes with its process.
    assert!(
        stream_end <= Duration::from_secs(1),
        "the error event came {stream_end:?} after the kill"
    );
    // Its record lingers until node 1 is back, but calls through it fail fast.
    let asked = Instant::now();
    let status = post(2, false).await.unwrap().status().as_u16();
    let refused = asked.elapsed();
    assert!(matches!(status, 502 | 503), "{status}");
    println!(
        "node 1 killed with -9 during a forwarded stream: the client got an error event {} ms \
         later; a new call for its replica got {status} in {} ms",
        stream_end.as_millis(),
        refused.as_millis()
    );
    assert!(refused < Duration::from_secs(3));

    // The owner back (its replica now 1.5 s to its first token): calls through it work again.
    h.extra.insert(
        1,
        replica_section(
            port,
            "[vllm.env]\nMOCK_VLLM_SCRIPT = \"tokens=30;itl_ms=20;ttft_ms=1500\"\n",
        ),
    );
    h.configure(1, &[1, 2, 3], false);
    h.start(1).await;
    let restarted = Instant::now();
    h.wait_each(
        &[2, 3],
        "to call the restarted owner's replica",
        T,
        |id| async move { post(id, false).await.is_ok_and(|r| r.status() == 200) },
    )
    .await;
    println!(
        "node 1 restarted: nodes 2 and 3 called its replica through the mesh again {} ms later",
        restarted.elapsed().as_millis()
    );
    // A client that leaves a forwarded stream before its first byte: the owner's call is
    // cancelled, not run to its end.
    let before = mock_stats().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), post(2, true)).await;
    let left = Instant::now();
    h.wait_for(
        "the replica to see the call cancelled before its first token",
        Duration::from_secs(3),
        || async {
            let s = mock_stats().await?;
            (s["aborted"].as_u64()? > before["aborted"].as_u64()?).then_some(())
        },
    )
    .await;
    let after = mock_stats().await.unwrap();
    println!(
        "a client that left a forwarded stream before its first byte: the replica's call was \
         closed {} ms later",
        left.elapsed().as_millis()
    );
    assert_eq!(
        after["requests"].as_u64(),
        before["requests"].as_u64().map(|n| n + 1),
        "the call reached the replica"
    );
    assert_eq!(
        after["completed"], before["completed"],
        "and was not run to its end"
    );
}

#[tokio::test]
async fn a_tenant_moved_to_another_region_is_served_only_there_by_every_node() {
    use meridian_tests::mock::{Flavor, MockUpstream};
    use meridian_tests::provider_toml;
    use std::sync::atomic::Ordering::SeqCst;
    let mock = || MockUpstream::with_flavor(Flavor::Vllm);
    let (us, eu) = (mock().await.unwrap(), mock().await.unwrap());
    let mut h = Harness::new(22);
    h.providers = format!(
        "{}{}",
        provider_toml(
            "us",
            &us.base_url(),
            &["m=mock@tokens:2"],
            "region = \"us\""
        ),
        provider_toml(
            "eu",
            &eu.base_url(),
            &["m=mock@tokens:2"],
            "region = \"eu\""
        ),
    );
    h.boot(&[1, 2, 3]).await;
    h.put_tier(1).await.unwrap();
    // As an operator would: the CLI, through node 1.
    let out = h.cli(
        1,
        &["tenant", "put", "acme", "--tier", "free", "--regions", "us"],
    );
    assert!(out.contains("tenant acme saved; changed:"), "{out}");
    let key = h.api_key(1, "acme").await.unwrap();
    let client = reqwest::Client::new();
    let chat = |id: u64| {
        let body = r#"{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#;
        status_of(chat_as(&client, &h.node(id).http(), &key, body))
    };
    h.wait_each(&[1, 2, 3], "to serve acme", T, |id| async move {
        chat(id).await == 200
    })
    .await;
    assert_eq!(eu.stats.requests.load(SeqCst), 0, "acme is held to the US");

    let out = h.cli(
        1,
        &["tenant", "put", "acme", "--tier", "free", "--regions", "eu"],
    );
    println!("moving acme to the EU: {out}");
    assert!(
        out.contains(r#"regions: ["us"] → ["eu"]"#),
        "the CLI says what changed: {out}"
    );
    assert!(!out.contains("nothing changed"), "{out}");
    h.wait_each(&[1, 2, 3], "to apply the move", T, |id| {
        let list = h.cli(id, &["tenant", "list"]);
        let applied = list
            .lines()
            .any(|l| l.starts_with("tenant acme") && l.contains("regions eu models any weight 1"));
        async move { applied }
    })
    .await;
    let (us_before, eu_before) = (
        us.stats.requests.load(SeqCst),
        eu.stats.requests.load(SeqCst),
    );
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..5 {
        for id in [1, 2, 3] {
            *statuses.entry(chat(id).await).or_insert(0) += 1;
        }
    }
    let (us_after, eu_after) = (
        us.stats.requests.load(SeqCst),
        eu.stats.requests.load(SeqCst),
    );
    println!(
        "after the move, through three nodes: {statuses:?}; upstream calls us +{} eu +{}",
        us_after - us_before,
        eu_after - eu_before
    );
    assert_eq!(statuses, [(200, 15)].into());
    assert_eq!(
        us_after, us_before,
        "no node served acme in the US after the move"
    );
    assert_eq!(
        eu_after - eu_before,
        15,
        "every request was served in the EU"
    );

    // The same put again changes nothing, and says so.
    let out = h.cli(
        2,
        &["tenant", "put", "acme", "--tier", "free", "--regions", "eu"],
    );
    assert!(out.contains("already so; nothing changed"), "{out}");
}

/// Reports are cluster-wide: calls through all three nodes, for three features and four end
/// users, some streamed, add up to a report that every node gives alike (`usage report`, from
/// the replicated roll-ups), and its totals are the sums of the three nodes' per-call records.
#[tokio::test]
async fn a_usage_report_is_the_same_on_every_node_and_adds_up_to_the_call_records() {
    use meridian_proto::pb::admin as pb;
    use meridian_tests::mock::{Flavor, MockUpstream};
    let mock = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    let mut h = Harness::new(25);
    h.providers = meridian_tests::provider_toml("mock", &mock.base_url(), &["m"], "")
        + "[[prices]]\nmodel = \"m\"\ninput_usd_per_mtok = 2.0\noutput_usd_per_mtok = 8.0\n";
    boot_with_acme(&mut h).await;
    let key = h.api_key(1, "acme").await.unwrap();
    let client = reqwest::Client::new();
    const CALLS: usize = 30;
    for i in 0..CALLS {
        let node = h.node(1 + (i % 3) as u64).http();
        let feature = ["search", "chat", "summaries"][(i / 3) % 3];
        let body = format!(
            r#"{{"model":"m","max_tokens":20,"user":"u{}","stream":{},"messages":[{{"role":"user","content":"call {i}"}}]}}"#,
            i % 4,
            i % 5 == 0
        );
        // The key was made through node 1: the others may not have applied it yet.
        h.wait_for("an answered call", T, || {
            let req = chat_as(&client, &node, &key, body.clone())
                .header("x-meridian-feature", feature)
                .send();
            async move {
                let resp = req.await.ok().filter(|r| r.status() == 200)?;
                resp.bytes().await.ok().map(|_| ())
            }
        })
        .await;
    }

    // The per-call records of the three nodes, summed by feature.
    let records = || async {
        let mut by_feature = std::collections::BTreeMap::<String, [u64; 4]>::new();
        let mut n = 0;
        for id in [1, 2, 3] {
            let mut admin = h.admin(id).await?;
            let calls = admin
                .list_calls(pb::ListCallsRequest {
                    tenant: "acme".into(),
                    last: 1_000,
                })
                .await
                .ok()?
                .into_inner()
                .calls;
            for c in calls.iter().filter(|c| c.code == "ok") {
                let sum = by_feature.entry(c.feature.clone()).or_default();
                sum[0] += 1;
                sum[1] += c.input_tokens;
                sum[2] += c.output_tokens;
                sum[3] += c.cost_micro_usd;
                n += 1;
            }
        }
        (n == CALLS).then_some(by_feature)
    };
    let from_records = h.wait_for("every call's record", T, records).await;
    let report = |id: u64| {
        h.usage_report(id, &["--days", "7", "--by", "feature"])
            .iter()
            .map(|r| {
                let n = |f: &str| r[f].as_u64().unwrap();
                (
                    r["feature"].as_str().unwrap().to_owned(),
                    [
                        n("requests"),
                        n("input_tokens"),
                        n("output_tokens"),
                        n("cost_micro_usd"),
                    ],
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    h.wait_for("the report to add up on every node", T, || {
        let reports = [report(1), report(2), report(3)];
        let same = reports.iter().all(|r| *r == from_records);
        async move { same.then_some(()) }
    })
    .await;
    println!("usage by feature, from the records and from every node's report: {from_records:?}");
    assert_eq!(from_records.len(), 3, "three features");
    assert!(
        from_records
            .values()
            .all(|[_, input, output, cost]| *input > 0 && *output > 0 && *cost > 0),
        "{from_records:?}"
    );

    // Other groupings, formats and a bad request.
    let users = h.cli(
        1,
        &[
            "usage", "report", "--by", "user", "--tenant", "acme", "--format", "csv",
        ],
    );
    let mut lines = users.lines();
    assert_eq!(
        lines.next(),
        Some("user,requests,input_tokens,output_tokens,cached_tokens,cache_hits,cost_usd")
    );
    assert_eq!(lines.count(), 4, "four users: {users}");
    let table = h.cli(2, &["usage", "report", "--by", "model"]);
    assert!(
        table.contains("usage by model from ") && table.contains("\nm "),
        "{table}"
    );
    let mut admin = h.admin(3).await.unwrap();
    let bad = admin
        .usage_report(pb::UsageReportRequest {
            by: "colour".into(),
            ..pb::UsageReportRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("by"), "{}", bad.message());
}

/// Spend alerts are decided once for the whole cluster: a tenant's calls through all three
/// nodes take it past 50 % and 80 % of its daily cost cap, and the webhook (which refuses its
/// first post, so that the retry is seen) takes exactly one alert of each, whichever nodes
/// saw the spend and however often the leader looks.
#[tokio::test]
async fn a_tenant_crossing_80_percent_of_its_daily_cap_alerts_the_webhook_exactly_once() {
    use axum::routing::post;
    use meridian_proto::pb::admin as pb;
    use meridian_tests::mock::{Flavor, MockUpstream};
    use std::sync::{Arc, Mutex};

    // The webhook: refuses the first post, keeps every later one.
    let posts: Arc<Mutex<(u32, Vec<serde_json::Value>)>> = Arc::default();
    let hook = {
        let posts = Arc::clone(&posts);
        axum::Router::new().route(
            "/hook",
            post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let posts = Arc::clone(&posts);
                async move {
                    let mut p = posts.lock().unwrap();
                    p.0 += 1;
                    if p.0 == 1 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    p.1.push(body);
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let mock = MockUpstream::with_flavor(Flavor::Vllm).await.unwrap();
    let mut h = Harness::new(26);
    h.test_clock();
    // Each call: 3 prompt tokens at $20/M and 8 completion tokens at $80/M = 700 µ$.
    h.providers = meridian_tests::provider_toml("mock", &mock.base_url(), &["m"], "")
        + "[[prices]]\nmodel = \"m\"\ninput_usd_per_mtok = 20.0\noutput_usd_per_mtok = 80.0\n";
    for id in [1, 2, 3] {
        h.extra.insert(
            id,
            format!("[alerts]\nwebhook = {webhook:?}\ncheck_every = \"200ms\"\n"),
        );
    }
    h.boot(&[1, 2, 3]).await;
    // A daily cap: not across midnight (the next day starts from nothing).
    h.inside_one_day(Duration::from_secs(120)).await;
    let mut admin = h.admin(1).await.unwrap();
    admin
        .put_tier(pb::PutTierRequest {
            tier: Some(meridian_tests::tier(
                "capped",
                limit::cost_per_day_micro_usd(10_000), // one cent a day
            )),
        })
        .await
        .unwrap();
    admin
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(meridian_tests::tenant("acme", "capped")),
        })
        .await
        .unwrap();
    let key = h.api_key(1, "acme").await.unwrap();
    let client = reqwest::Client::new();
    // Twelve calls: $0.0084 of the $0.01 cap (84 %).
    for i in 0..12u64 {
        let node = h.node(1 + i % 3).http();
        let body = format!(
            r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"call {i}"}}]}}"#
        );
        h.wait_for("an answered call", T, || {
            let req = chat_as(&client, &node, &key, body.clone()).send();
            async move {
                let resp = req.await.ok().filter(|r| r.status() == 200)?;
                resp.bytes().await.ok().map(|_| ())
            }
        })
        .await;
    }
    let delivered = |threshold: &str| {
        let p = posts.lock().unwrap();
        p.1.iter()
            .filter(|b| b["alert"]["threshold"] == threshold)
            .count()
    };
    h.wait_for("the 80 % alert at the webhook", T, || {
        let n = delivered("80%");
        async move { (n > 0).then_some(()) }
    })
    .await;
    // Several more looks by the leader, and every node's flushes: nothing more comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (attempts, bodies) = posts.lock().unwrap().clone();
    println!("webhook: {attempts} posts, kept {bodies:?}");
    assert_eq!(delivered("80%"), 1, "{bodies:?}");
    assert_eq!(delivered("50%"), 1, "{bodies:?}");
    assert_eq!(delivered("100%"), 0, "{bodies:?}");
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(attempts, 3, "one refused post, retried");
    let eighty = bodies
        .iter()
        .find(|b| b["alert"]["threshold"] == "80%")
        .unwrap();
    assert_eq!(eighty["alert"]["tenant"], "acme");
    assert_eq!(eighty["alert"]["cap_usd"], 0.01);
    let text = eighty["text"].as_str().unwrap();
    assert!(
        text.contains("Tenant acme has spent $0.0084")
            && text.contains("80% of its daily cap of $0.01"),
        "{text}"
    );
    // Recorded once in the replicated state (delivered), and counted once in the cluster.
    let mut fired = 0.0;
    for id in [1, 2, 3] {
        fired += metric(
            &h.node(id).http(),
            "meridian_spend_alerts_total{result=\"fired\"}",
        )
        .await
        .unwrap_or(0.0);
    }
    assert_eq!(fired, 2.0, "fired once each, over the whole cluster");
    let state = h.cli(2, &["cluster", "state", "alerts"]);
    assert_eq!(
        state.matches("\"delivered_at_unix_ms\":").count(),
        2,
        "{state}"
    );
    assert!(!state.contains("\"delivered_at_unix_ms\":null"), "{state}");
}

/// A call forwarded over the actor mesh is one trace over two nodes: node 2 (which the client
/// called) exports its server span, joined to the client's trace, and its attempt (a client
/// span); node 1, which owns the replica, exports its span of the forwarded call as that
/// attempt's child.
#[tokio::test]
async fn a_streamed_call_forwarded_over_the_mesh_is_one_trace_over_two_nodes() {
    use meridian_tests::otlp::{Collector, attribute, hex};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let (collector, otlp) = Collector::start().await.unwrap();
    let traces = format!("[traces]\nendpoint = \"http://{otlp}\"\n");
    let held = ReservedPort::new().unwrap();
    let port = held.port();
    let mut h = Harness::new(27);
    h.extra.insert(2, traces.clone());
    h.extra.insert(3, traces.clone());
    let key = boot_with_replica(
        &mut h,
        port,
        &format!("[vllm.env]\nMOCK_VLLM_SCRIPT = \"tokens=5;itl_ms=5\"\n{traces}"),
    )
    .await;
    let client = reqwest::Client::new();
    let node2 = h.node(2).http();
    h.wait_for("node 2 to route to node 1's replica", T, || {
        let req = chat_as(
            &client,
            &node2,
            &key,
            r#"{"model":"llama-8b","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .send();
        async move { req.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
    })
    .await;

    let trace_id = "5af7183fb1d4cf5f0a6b1e2c3d4e5f60";
    let client_span = "1a2b3c4d5e6f7081";
    let resp = chat_as(
        &client,
        &node2,
        &key,
        r#"{"model":"llama-8b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("[DONE]"));

    let of_trace = || {
        collector
            .by_node()
            .into_iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace_id)
            .collect::<Vec<_>>()
    };
    let spans = h
        .wait_for("the spans of both nodes", T, || {
            let spans = of_trace();
            let from = |node: &str, kind: SpanKind| {
                spans
                    .iter()
                    .any(|(n, s)| n == node && s.kind == kind as i32)
            };
            let all = from("2", SpanKind::Server)
                && from("2", SpanKind::Client)
                && from("1", SpanKind::Server);
            async move { all.then_some(spans) }
        })
        .await;
    let find = |node: &str, kind: SpanKind| {
        spans
            .iter()
            .find(|(n, s)| n == node && s.kind == kind as i32)
            .map(|(_, s)| s)
            .unwrap()
    };
    let (server, attempt, owner) = (
        find("2", SpanKind::Server),
        find("2", SpanKind::Client),
        find("1", SpanKind::Server),
    );
    println!(
        "trace {trace_id}: node 2 {} ← client; node 2 {} (attempt); node 1 {} (forwarded)",
        server.name, attempt.name, owner.name
    );
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        owner.parent_span_id, attempt.span_id,
        "the owner's span is the forwarder's attempt's child"
    );
    assert_eq!(
        attribute(owner, "meridian.forwarded").as_deref(),
        Some("true")
    );
    assert_eq!(
        attribute(owner, "gen_ai.request.stream").as_deref(),
        Some("true")
    );
    assert!(
        attribute(owner, "meridian.provider").is_some_and(|p| p.starts_with("1/")),
        "{owner:?}"
    );
    assert_eq!(attribute(server, "meridian.code").as_deref(), Some("ok"));
}

/// A node started by a service manager (standard output not a terminal) prints no secret: the
/// admin token and the development key it makes on first start go to files only its user can
/// read, and it says where. The key in the file works.
#[tokio::test]
async fn first_start_secrets_are_not_printed_where_a_log_would_keep_them() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[[providers]]\nid = \"demo\"\nkind = \"demo\"\nmodels = [\"demo\"]\n"
        ),
    )
    .unwrap();
    let mut child = serve(&config, std::process::Stdio::piped()).unwrap();
    let mut printed = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let http = loop {
        let line = lines.next().expect("a readiness line").unwrap();
        printed.push(line.clone());
        if let Some(rest) = line.strip_prefix("meridian ready http=") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let secret = |name: &str| {
        let path = data.join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} is readable by its user only");
        std::fs::read_to_string(path).unwrap().trim().to_owned()
    };
    let (token, key) = (secret("admin.token"), secret("dev.key"));
    let text = printed.join("\n");
    println!("printed on first start:\n{text}");
    assert!(!text.contains(&token) && !text.contains(&key), "{text}");
    assert!(
        text.contains("dev.key") && text.contains("admin.token"),
        "{text}"
    );
    let status = chat_as(
        &reqwest::Client::new(),
        &format!("http://{http}"),
        &key,
        r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .send()
    .await
    .unwrap()
    .status();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "the key in the file works");
}

/// `meridian admin cluster revoke-cert`: a second certificate of node 2 (an old or stolen one)
/// is revoked through one node and every node holds the revocation (the transport then refuses
/// it: `cluster/tests/quic_cluster.rs`); node 2 itself goes on.
#[tokio::test]
async fn a_certificate_revoked_through_one_node_is_in_every_nodes_state_within_2_s() {
    use meridian_proto::pb::admin as pb;
    let mut h = Harness::new(30);
    let ids = [1, 2, 3];
    let leader = h.boot(&ids).await;
    let other = tempfile::tempdir().unwrap();
    meridian_cluster::certs::issue(other.path(), &h.ca_key(), 2, &[]).unwrap();
    let cert = other.path().join("node-2.crt");
    let fingerprint = meridian_cluster::certs::fingerprint_file(&cert).unwrap();
    let revoked = Instant::now();
    let said = h.cli(
        leader,
        &[
            "cluster",
            "revoke-cert",
            cert.to_str().unwrap(),
            "--node",
            "2",
        ],
    );
    assert!(said.contains(&fingerprint), "{said}");
    // Every node holds it within the bound revoked API keys are held to, looked at in parallel.
    let (h, fingerprint) = (&h, &fingerprint);
    let took = h
        .all_within(
            &ids,
            "to hold the revocation",
            revoked,
            Duration::from_secs(2),
            |id| async move {
                let Some(mut admin) = h.admin(id).await else {
                    return false;
                };
                let request = pb::ClusterStateRequest {
                    section: "revoked_certs".into(),
                    ..Default::default()
                };
                admin
                    .cluster_state(request)
                    .await
                    .is_ok_and(|r| r.into_inner().json.contains(fingerprint.as_str()))
            },
        )
        .await;
    println!("the revocation was held by every node {took:?} after it was asked");
    h.put_tier(2).await.expect("node 2 still writes");
}
