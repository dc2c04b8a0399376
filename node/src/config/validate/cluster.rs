//! `[cluster]`: Raft's timings, and the peers, addresses, certificates and mesh of a node in a
//! cluster (`None`: a single node, its own cluster).

use super::*;

pub(super) fn validate(
    e: &mut Errors,
    c: &super::super::raw::RawCluster,
    node: u64,
    env: &dyn Env,
) -> (RaftTimings, Option<ClusterPeers>) {
    let rd = RaftTimings::default();
    let raft = RaftTimings {
        heartbeat: duration(e, "cluster.heartbeat", c.heartbeat.as_ref(), rd.heartbeat),
        election_min: duration(
            e,
            "cluster.election_timeout_min",
            c.election_timeout_min.as_ref(),
            rd.election_min,
        ),
        election_max: duration(
            e,
            "cluster.election_timeout_max",
            c.election_timeout_max.as_ref(),
            rd.election_max,
        ),
        snapshot_every: u64::from(int(
            e,
            "cluster.snapshot_every",
            c.snapshot_every,
            10_000,
            10,
            100_000_000,
        )),
        keep_after_snapshot: u64::from(int(
            e,
            "cluster.keep_after_snapshot",
            c.keep_after_snapshot,
            1_000,
            0,
            100_000_000,
        )),
    };
    if raft.election_min <= raft.heartbeat {
        e.push(
            "cluster.election_timeout_min",
            "must be longer than cluster.heartbeat",
        );
    }
    if raft.election_max <= raft.election_min {
        e.push(
            "cluster.election_timeout_max",
            "must be longer than cluster.election_timeout_min",
        );
    }
    let cluster = if c.peers.is_empty() && !c.join {
        None
    } else {
        let mut peers = Vec::new();
        for (i, p) in c.peers.iter().enumerate() {
            let parsed = p
                .split_once('@')
                .and_then(|(id, addr)| Some((id.parse::<u64>().ok()?, host_port(addr)?)));
            match parsed {
                Some((id, _)) if id == node => {
                    e.push(format!("cluster.peers[{i}]"), "lists this node itself");
                }
                Some(peer) => peers.push(peer),
                None => e.push(
                    format!("cluster.peers[{i}]"),
                    format!(
                        "{p:?} is not ID@HOST:PORT (e.g. 2@10.0.0.2:7000 or 2@meridian-1.meridian:7000)"
                    ),
                ),
            }
        }
        let listen = addr(e, "cluster.listen", c.listen.as_ref(), "127.0.0.1:7000");
        // Where peers reach this node: an address, or a name resolved each time they dial
        // (a Kubernetes pod's stable DNS name outlives its IP).
        let advertise = match &c.advertise {
            Some(a) => host_port(a).unwrap_or_else(|| {
                e.push(
                    "cluster.advertise",
                    format!("{a:?} is not HOST:PORT (an address or a DNS name, and a port)"),
                );
                listen.to_string()
            }),
            None => listen.to_string(),
        };
        if advertise
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_unspecified())
        {
            e.push(
                if c.advertise.is_some() {
                    "cluster.advertise"
                } else {
                    "cluster.listen"
                },
                format!(
                    "{advertise} is not an address peers can reach; set cluster.advertise to this node's address"
                ),
            );
        }
        let certs_dir = PathBuf::from(
            c.certs_dir
                .clone()
                .unwrap_or_else(|| "./meridian-certs".into()),
        );
        for file in [
            "ca.crt".to_owned(),
            format!("node-{}.crt", node),
            format!("node-{}.key", node),
        ] {
            if !certs_dir.join(&file).exists() {
                e.push(
                    "cluster.certs_dir",
                    format!(
                        "{} has no {file} (create it with `meridian certs init` and `meridian certs issue {}`)",
                        certs_dir.display(),
                        node
                    ),
                );
            }
        }
        let mesh_listen = match &c.mesh_listen {
            Some(_) => addr(e, "cluster.mesh_listen", c.mesh_listen.as_ref(), ""),
            None => SocketAddr::new(listen.ip(), listen.port().wrapping_add(1)),
        };
        let mesh_advertise = match advertise.parse::<SocketAddr>() {
            Ok(a) => SocketAddr::new(a.ip(), mesh_listen.port()).to_string(),
            Err(_) => {
                let host = advertise.rsplit_once(':').map_or("", |(h, _)| h);
                format!("{host}:{}", mesh_listen.port())
            }
        };
        let mesh_cookie = secret_env(
            e,
            env,
            "cluster.mesh_cookie_env",
            c.mesh_cookie_env.as_ref(),
            16,
        );
        Some(ClusterPeers {
            listen,
            advertise,
            certs_dir,
            peers,
            join: c.join,
            mesh_listen,
            mesh_advertise,
            mesh_cookie,
        })
    };
    (raft, cluster)
}
