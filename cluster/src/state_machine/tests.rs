use openraft::storage::RaftLogStorage;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, RaftLogReader, Vote};

use super::*;
use crate::store::LogStore;

/// A fresh store and state machine in a temp dir that lives as long as the test case.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let log = LogStore::open(&dir.path().join("raft.redb"))?;
        let sm = StateMachine::open(&dir.path().join("sm"))?;
        Ok((dir, log, sm))
    }
}

/// openraft's own storage conformance suite, against the real redb store and state machine.
#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(Builder)
}

fn entry(index: u64, command: meridian_proto::cluster::Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(meridian_proto::cluster::Proposal {
            at_unix_ms: index * 10,
            proposer: 1,
            command,
        }),
    }
}

fn member(id: NodeId) -> meridian_proto::cluster::Command {
    member_reading(id, 0)
}

/// Node `id`'s record, saying it reads snapshots up to `snapshot_format`.
fn member_reading(id: NodeId, snapshot_format: u32) -> meridian_proto::cluster::Command {
    meridian_proto::cluster::Command::UpsertMember(meridian_proto::cluster::Member {
        id,
        region: "eu".into(),
        raft_addr: format!("127.0.0.{id}:7000"),
        http_addr: format!("127.0.0.{id}:8080"),
        mesh_addr: String::new(),
        started_unix_ms: 0,
        snapshot_format,
    })
}

/// A disk that keeps only what was synced: writes change a working image, `sync_data` makes it
/// durable, and a crash leaves the durable image alone.
/// Clones share the disk.
#[derive(Debug, Default, Clone)]
struct SyncedOnly {
    working: Arc<std::sync::Mutex<Vec<u8>>>,
    durable: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl SyncedOnly {
    /// The disk as a crash leaves it: what was synced, nothing after.
    fn after_crash(&self) -> Self {
        let durable = Arc::clone(&self.durable);
        let image = durable.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Self {
            working: Arc::new(std::sync::Mutex::new(image)),
            durable,
        }
    }

    fn image(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.working.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl redb::StorageBackend for SyncedOnly {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.image().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let image = self.image();
        let at = offset as usize;
        let bytes = image
            .get(at..at + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.image().resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let image = self.image().clone();
        *self.durable.lock().unwrap_or_else(|p| p.into_inner()) = image;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut image = self.image();
        let at = offset as usize;
        image
            .get_mut(at..at + data.len())
            .ok_or_else(|| std::io::Error::other("write past the end"))?
            .copy_from_slice(data);
        Ok(())
    }
}

/// What the store acknowledged (appended entries, the vote, a purge) is on the synced disk: a
/// crash that loses every unsynced write loses none of it. A write committed without its fsync
/// fails this test.
#[tokio::test]
async fn acknowledged_log_writes_survive_a_crash_that_loses_every_unsynced_write()
-> Result<(), StorageError> {
    use openraft::storage::RaftLogStorageExt;
    let disk = SyncedOnly::default();
    let mut log = LogStore::open_on(disk.clone())?;
    log.blocking_append((1..=50).map(|i| entry(i, member(i))))
        .await?;
    log.save_vote(&Vote::new_committed(7, 2)).await?;
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 10))
        .await?;
    // More work the store never acknowledged is not asked of it: the crash comes now.
    let crashed = disk.after_crash();
    drop(log);
    let mut log = LogStore::open_on(crashed)?;
    let state = log.get_log_state().await?;
    assert_eq!(state.last_log_id.map(|l| l.index), Some(50));
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(10));
    assert_eq!(log.read_vote().await?, Some(Vote::new_committed(7, 2)));
    let kept = log.try_get_log_entries(11..=50).await?;
    assert_eq!(
        kept.len(),
        40,
        "every acknowledged entry after the purge point"
    );
    Ok(())
}

#[tokio::test]
async fn log_vote_and_snapshot_survive_a_reopen() -> Result<(), StorageError> {
    use openraft::storage::RaftLogStorageExt;
    let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let (log_path, sm_dir) = (dir.path().join("raft.redb"), dir.path().join("sm"));
    {
        let mut log = LogStore::open(&log_path)?;
        log.blocking_append([
            entry(1, member(1)),
            entry(2, member(2)),
            entry(3, member(3)),
        ])
        .await?;
        log.save_vote(&Vote::new_committed(4, 1)).await?;
        let mut sm = StateMachine::open(&sm_dir)?;
        let watched = sm.subscribe();
        sm.apply([entry(1, member(1)), entry(2, member(2))]).await?;
        assert_eq!(
            watched.borrow().members.len(),
            2,
            "applied state is published"
        );
        sm.get_snapshot_builder().await.build_snapshot().await?;
        sm.apply([entry(3, member(3))]).await?;
    }
    let mut log = LogStore::open(&log_path)?;
    let entries = log.try_get_log_entries(1..=3).await?;
    assert_eq!(entries.len(), 3);
    assert_eq!(log.read_vote().await?, Some(Vote::new_committed(4, 1)));
    let mut sm = StateMachine::open(&sm_dir)?;
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(
        applied.map(|l| l.index),
        Some(2),
        "state comes back from the snapshot"
    );
    assert_eq!(sm.subscribe().borrow().members.len(), 2);
    assert!(sm.get_current_snapshot().await?.is_some());
    Ok(())
}

/// A state with something in every table, breakers open and closed among them.
fn full_state() -> ClusterState {
    use meridian_proto::cluster::*;
    let mut s = ClusterState::default();
    let mut at = 1_000;
    let mut apply = |command: Command| {
        at += 1;
        s.apply(&Proposal {
            at_unix_ms: at,
            proposer: 1,
            command,
        });
    };
    apply(member(1));
    apply(Command::UpsertTier(Tier {
        name: "free".into(),
        ..Tier::default()
    }));
    apply(Command::UpsertTenant(Tenant {
        id: "acme".into(),
        tier: "free".into(),
        regions: vec!["eu".into()],
        weight: 2,
        ..Tenant::default()
    }));
    apply(Command::CreateApiKey(ApiKeyRecord {
        id: "0123456789ab".into(),
        tenant: "acme".into(),
        sha256_hex: "ab".repeat(32),
        label: "ci".into(),
        created_at_unix_ms: 0,
        revoked_at_unix_ms: None,
    }));
    apply(Command::RequestGrant(GrantRequest {
        key: "tenant/acme/tokens_per_minute".into(),
        node: 1,
        limit: 1_000,
        window_ms: 60_000,
        window_start_unix_ms: 0,
        amount: 10,
        ttl_ms: 60_000,
        share: 100,
        share_nodes: 3,
        share_used: 40,
        charged: 40,
    }));
    for (provider, state) in [
        (
            "a",
            BreakerState::Open {
                until_unix_ms: 9_000,
            },
        ),
        ("b", BreakerState::Closed),
    ] {
        apply(Command::SetBreaker {
            provider: provider.into(),
            state,
            reason: "test".into(),
            trips: 1,
            forced: true,
            expect_version: None,
            groups: Vec::new(),
        });
    }
    apply(Command::RecordUsage {
        tenant: "acme".into(),
        model: "m".into(),
        totals: UsageTotals {
            requests: 1,
            prompt_tokens: 5,
            ..UsageTotals::default()
        },
        retain_days: 90,
        provider: "vllm-a".into(),
        feature: "search".into(),
        user: "u1".into(),
        max_users: 1_000,
        day: None,
    });
    assert!(!s.ledger.is_empty() && !s.breakers.is_empty() && !s.usage.is_empty());
    s
}

#[test]
fn snapshot_bodies_round_trip_compressed_and_not_and_json_bodies_still_read() {
    let body = SnapshotBody {
        last_applied: Some(LogId::new(CommittedLeaderId::new(2, 1), 42)),
        last_membership: Membership::default(),
        state: full_state(),
    };
    let packed = encode_body(&body, false).expect("encodes");
    let compressed = encode_body(&body, true).expect("encodes");
    let json = serde_json::to_vec(&body).expect("encodes");
    println!(
        "snapshot body: {} bytes compressed, {} packed, {} as JSON",
        compressed.len(),
        packed.len(),
        json.len()
    );
    assert!(packed.len() < json.len());
    assert!(compressed.starts_with(&ZSTD_MAGIC) && !packed.starts_with(&ZSTD_MAGIC));
    for bytes in [&compressed, &packed, &json] {
        let back = decode_body(bytes).expect("decodes");
        assert_eq!(back.state, body.state);
        assert_eq!(back.last_applied, body.last_applied);
    }
}

#[tokio::test]
async fn a_snapshot_file_of_the_earlier_format_is_read_and_replaced() -> Result<(), StorageError> {
    let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let state = full_state();
    let meta = Meta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 7)),
        last_membership: Membership::default(),
        snapshot_id: "7-1".into(),
    };
    let body = SnapshotBody {
        last_applied: meta.last_log_id,
        last_membership: Membership::default(),
        state: state.clone(),
    };
    let old = SnapshotFile {
        meta,
        data: serde_json::to_vec(&body).map_err(|e| snap_err(ErrorVerb::Write, e))?,
    };
    std::fs::write(
        dir.path().join(OLD_SNAPSHOT_FILE),
        serde_json::to_vec(&old).map_err(|e| snap_err(ErrorVerb::Write, e))?,
    )
    .map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let mut sm = StateMachine::open(dir.path())?;
    assert_eq!(*sm.subscribe().borrow().as_ref(), state);
    sm.get_snapshot_builder().await.build_snapshot().await?;
    assert!(!dir.path().join(OLD_SNAPSHOT_FILE).exists());
    let reopened = StateMachine::open(dir.path())?;
    assert_eq!(*reopened.subscribe().borrow().as_ref(), state);
    Ok(())
}

/// What a snapshot's body starts with, as the file on disk holds it.
fn body_on_disk(dir: &Path) -> Vec<u8> {
    let (_, data) = read_file(dir).expect("reads").expect("a snapshot file");
    data
}

#[tokio::test]
async fn snapshots_are_compressed_only_once_every_member_reads_them() -> Result<(), StorageError> {
    let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let mut sm = StateMachine::open(dir.path())?;
    let nodes = |index: u64, ids: &[NodeId]| {
        let nodes: std::collections::BTreeMap<NodeId, BasicNode> =
            ids.iter().map(|id| (*id, BasicNode::new("x"))).collect();
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Membership(openraft::Membership::new(
                vec![ids.iter().copied().collect()],
                nodes,
            )),
        }
    };
    let build = async |sm: &mut StateMachine| -> Result<bool, StorageError> {
        sm.get_snapshot_builder().await.build_snapshot().await?;
        let data = body_on_disk(dir.path());
        let state = decode_body(&data)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .state;
        assert_eq!(
            state,
            **sm.subscribe().borrow(),
            "the snapshot holds the state"
        );
        Ok(data.starts_with(&ZSTD_MAGIC))
    };
    sm.apply([nodes(1, &[1, 2])]).await?;
    sm.apply([entry(2, member_reading(1, SNAPSHOT_FORMAT))])
        .await?;
    assert!(!build(&mut sm).await?, "node 2 has not said what it reads");
    sm.apply([entry(3, member_reading(2, 0))]).await?;
    assert!(
        !build(&mut sm).await?,
        "node 2 runs a version that reads no compressed snapshot"
    );
    sm.apply([entry(4, member_reading(2, SNAPSHOT_FORMAT))])
        .await?;
    assert!(
        build(&mut sm).await?,
        "every member reads compressed snapshots"
    );
    // A member added later that has not said what it reads turns compression off again.
    sm.apply([nodes(5, &[1, 2, 3])]).await?;
    assert!(!build(&mut sm).await?);
    // A compressed snapshot is what the state machine reopens from.
    sm.apply([entry(6, member_reading(3, SNAPSHOT_FORMAT))])
        .await?;
    assert!(build(&mut sm).await?);
    let reopened = StateMachine::open(dir.path())?;
    assert_eq!(**reopened.subscribe().borrow(), **sm.subscribe().borrow());
    Ok(())
}

/// The state machine applies to a spare copy and takes the version it replaces back as the
/// next spare. What it publishes is what one copy applying every entry in turn holds, whether
/// or not readers hold versions and across a snapshot installed; and once the copies have
/// parted, an apply that no reader overlaps changes its entries in place: it allocates the
/// published version's handle and its answers, and copies no node or entry.
#[test]
fn the_two_copies_publish_what_one_would_and_change_in_place_when_no_one_holds_them()
-> Result<(), StorageError> {
    use meridian_proto::cluster::Command;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let sm = StateMachine::open(dir.path())?;
    let report = |user: u64| Command::ReportUsage {
        key: format!("tenant/t/user/u{user}/tokens_per_day"),
        node: 1 + user % 3,
        window_start_unix_ms: 0,
        delta: 7,
        limit: 1_000_000,
        window_ms: 86_400_000,
    };
    /// The state machine, and one copy applying every entry in turn.
    struct Pair {
        runtime: tokio::runtime::Runtime,
        sm: StateMachine,
        one: ClusterState,
        index: u64,
    }
    impl Pair {
        /// Applies `commands` as one call, checks what is published and kept, and says how
        /// many allocations the call made.
        fn apply(&mut self, commands: Vec<Command>, held: bool) -> Result<u64, StorageError> {
            let rejoins = self.sm.lock().rejoin_after.is_zero()
                || commands.iter().map(Command::commands).sum::<usize>() >= BULK;
            let mut entries: Vec<Entry> = (commands.into_iter())
                .map(|c| {
                    self.index += 1;
                    entry(self.index, c)
                })
                .collect();
            // Now and then an entry that changes no state (openraft's blank one).
            if self.index.is_multiple_of(5) {
                self.index += 1;
                entries.push(Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
                    payload: EntryPayload::Blank,
                });
            }
            let before = self.one.clone();
            for e in &entries {
                if let EntryPayload::Normal(p) = &e.payload {
                    self.one.apply(p);
                }
            }
            let held = held.then(|| self.sm.subscribe().borrow().clone());
            let mut applied = Ok(Vec::new());
            let allocated = allocation_counter::measure(|| {
                applied = self.runtime.block_on(self.sm.apply(entries));
            })
            .count_total;
            applied?;
            assert_eq!(
                **self.sm.subscribe().borrow(),
                self.one,
                "entry {}",
                self.index
            );
            let g = self.sm.lock();
            // Brought up to date, the spare holds what was published, wanted marks included
            // (they are no part of the state's equality).
            let mut caught_up = g.spare.clone();
            for p in &g.lag {
                caught_up.apply(p);
            }
            assert_eq!(caught_up, self.one);
            let current = self.sm.current();
            assert_eq!(caught_up.ledger.wants(), current.ledger.wants());
            let (epoch, _) = current.ledger.wants();
            let marked = |l: &meridian_proto::cluster::LedgerTable| -> Option<Vec<String>> {
                Some(l.wanted_since((epoch, 0))?.map(|k| k.to_string()).collect())
            };
            assert_eq!(marked(&caught_up.ledger), marked(&current.ledger));
            drop(caught_up);
            // The version held is kept to be freed here once its reader lets go; the one held
            // at the apply before is gone.
            assert_eq!(g.retired.len(), usize::from(held.is_some()));
            if held.is_some() || rejoins {
                assert!(
                    g.lag.is_empty(),
                    "the spare is a clone of the current version"
                );
                assert!(g.spare.ledger.ptr_eq(&self.sm.current().ledger));
                assert_eq!(g.spare, self.one);
            } else {
                assert_eq!(g.spare, before, "the spare is the version replaced");
            }
            Ok(allocated)
        }
    }
    let mut pair = Pair {
        runtime,
        sm,
        one: ClusterState::default(),
        index: 0,
    };
    // A grant that comes up short while static shares are held: its entry is marked wanted.
    let short_grant = |user: u64| {
        Command::RequestGrant(meridian_proto::cluster::GrantRequest {
            key: format!("tenant/t/user/u{user}/tokens_per_day"),
            node: 1,
            limit: 1_000,
            window_ms: 86_400_000,
            window_start_unix_ms: 0,
            amount: 1_000,
            ttl_ms: 5_000,
            share: 300,
            share_nodes: 3,
            share_used: 0,
            charged: 0,
        })
    };
    let mut snapshot = None;
    for round in 0..60u64 {
        // A report on the first user, new users and members, in one to three entries, and now
        // and then a short grant; every seventh round a reader holds the published version
        // across the apply.
        let mut commands = vec![report(0)];
        for j in 0..round % 3 {
            commands.push(match j {
                0 => report(round * 7 + 1),
                _ => member(round % 4),
            });
        }
        if round % 5 == 1 {
            commands.push(short_grant(1_000 + round));
        }
        pair.apply(commands, round % 7 == 3)?;
        if round == 30 {
            let snapshot_of = pair
                .runtime
                .block_on(async { pair.sm.get_snapshot_builder().await.build_snapshot().await })?;
            snapshot = Some((snapshot_of, pair.one.clone()));
        }
        if round == 36
            && let Some((taken, then)) = snapshot.take()
        {
            // The snapshot of round 30 installed (a follower catching up): the copies start
            // over from it, whatever they held since.
            let sm = &mut pair.sm;
            pair.runtime
                .block_on(sm.install_snapshot(&taken.meta, taken.snapshot))?;
            pair.one = then;
            assert_eq!(
                **pair.sm.subscribe().borrow(),
                pair.one,
                "after the snapshot"
            );
        }
    }
    let (_, marks) = pair.sm.current().ledger.wants();
    assert!(
        marks >= 4,
        "short grants marked their entries wanted ({marks} since the snapshot)"
    );
    // A flush of reports on every user: once the copies hold those entries apart, the call
    // allocates what driving a future does, what applying the flush to a copy of one's own
    // does (twice: the replay and the apply), the published version's `Arc` and the vector of
    // answers, however many entries it changes; no node, no entry is copied.
    let users: Vec<u64> = (pair.one.ledger.keys())
        .filter_map(|k| {
            k.strip_prefix("tenant/t/user/u")?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        users.len() > 30,
        "{} users, over several B-tree leaves",
        users.len()
    );
    let flush = || Command::Batch {
        commands: users.iter().map(|u| report(*u)).collect(),
    };
    let on_its_own = {
        let mut own = pair.one.clone();
        let p = meridian_proto::cluster::Proposal {
            at_unix_ms: pair.index * 10,
            proposer: 1,
            command: flush(),
        };
        own.apply(&p);
        allocation_counter::measure(|| {
            own.apply(&p);
        })
        .count_total
    };
    let driving = allocation_counter::measure(|| pair.runtime.block_on(async {})).count_total;
    for _ in 0..3 {
        pair.apply(vec![flush()], false)?;
    }
    for _ in 0..2 {
        let allocated = pair.apply(vec![flush()], false)?;
        assert_eq!(
            allocated,
            driving + 2 * on_its_own + 2,
            "a flush of {} reports",
            users.len()
        );
    }
    // A bulk write joins the copies at once.
    pair.apply(
        vec![Command::Batch {
            commands: (0..BULK as u64).map(report).collect(),
        }],
        false,
    )?;
    pair.apply(vec![flush()], false)?;
    // When the copies join again (here at every apply), the spare is a clone of what is
    // published, and what is published is still what one copy holds.
    pair.sm.join_after(Duration::ZERO);
    for round in 0..5 {
        pair.apply(vec![flush(), member(round)], round == 2)?;
    }
    Ok(())
}

/// A snapshot built from the node's own state that is written after a newer one was installed
/// from the leader (the builder runs as a task of its own) leaves the installed one current,
/// on disk as well.
#[tokio::test]
async fn a_snapshot_built_before_one_installed_does_not_replace_it() -> Result<(), StorageError> {
    let dir = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let mut sm = StateMachine::open(dir.path())?;
    sm.apply([entry(1, member(1)), entry(2, member(2))]).await?;
    let own = sm.get_snapshot_builder().await.build_snapshot().await?;
    let leaders = tempfile::tempdir().map_err(|e| snap_err(ErrorVerb::Write, e))?;
    let mut leader = StateMachine::open(leaders.path())?;
    leader
        .apply((1..=4).map(|id| entry(id, member(id))))
        .await?;
    let newer = leader.get_snapshot_builder().await.build_snapshot().await?;
    sm.install_snapshot(&newer.meta, newer.snapshot).await?;
    // The node's own build, finishing now.
    let (kept, _) = sm
        .keep_built(own.meta.clone(), own.snapshot.into_inner())
        .await?;
    assert_eq!(
        kept.last_log_id, newer.meta.last_log_id,
        "the installed one is kept"
    );
    let current = sm.get_current_snapshot().await?.map(|s| s.meta.last_log_id);
    assert_eq!(current, Some(newer.meta.last_log_id));
    let on_disk =
        decode_body(&body_on_disk(dir.path())).map_err(|e| snap_err(ErrorVerb::Read, e))?;
    assert_eq!(
        on_disk.state.members.len(),
        4,
        "the file holds the installed snapshot"
    );
    assert_eq!(on_disk.state, **sm.subscribe().borrow());
    Ok(())
}
