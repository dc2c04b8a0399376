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
    meridian_proto::cluster::Command::UpsertMember(meridian_proto::cluster::Member {
        id,
        region: "eu".into(),
        raft_addr: format!("127.0.0.{id}:7000"),
        http_addr: format!("127.0.0.{id}:8080"),
        mesh_addr: String::new(),
    })
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
