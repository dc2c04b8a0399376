use super::*;

pub(crate) fn group() -> VllmGroup {
    VllmGroup {
        api_key: None,
        default_max_tokens: 1024,
        id: "llama".into(),
        model: "meta-llama/Llama-3.1-8B-Instruct".into(),
        served_names: vec!["llama-8b".into()],
        command: vec!["vllm".into()],
        extra_args: vec!["--enforce-eager".into()],
        env: vec![("HF_HOME".into(), "/models".into())],
        gpus: vec![0, 1, 2, 3],
        gpus_per_replica: 2,
        tensor_parallel_size: 2,
        max_num_seqs: Some(128),
        gpu_memory_utilization: Some(0.85),
        enable_prefix_caching: true,
        lora_modules: vec![LoraModule {
            name: "sql".into(),
            path: "/adapters/sql".into(),
        }],
        lora_runtime: false,
        host: "0.0.0.0".into(),
        advertise_host: "10.0.0.7".into(),
        via_mesh: false,
        ports: (8100, 8101),
        min_replicas: 1,
        max_replicas: 2,
        startup_budget: Duration::from_secs(600),
        health_interval: Duration::from_secs(2),
        scrape_interval: Duration::from_secs(5),
        health_failures: 3,
        hang_timeout: Duration::from_secs(60),
        restart: RestartPolicy::default(),
        drain_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(30),
        autoscale: Autoscale::default(),
        max_concurrency: 128,
        queue_capacity: 256,
        queue_timeout: Duration::from_secs(30),
        timeouts: Timeouts::default(),
        region: "eu-west".into(),
        weight: 1,
    }
}

#[test]
fn the_launch_line_maps_every_setting_to_vllms_flags() {
    let g = group();
    let l = g.launch(8101, &[2, 3]);
    assert_eq!(l.program, "vllm");
    assert_eq!(
        l.args.join(" "),
        "serve meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 --port 8101 \
         --served-model-name llama-8b --tensor-parallel-size 2 --max-num-seqs 128 \
         --gpu-memory-utilization 0.85 --enable-prefix-caching --enable-lora \
         --lora-modules sql=/adapters/sql --enforce-eager"
    );
    assert_eq!(
        l.env,
        [
            ("CUDA_VISIBLE_DEVICES".to_owned(), "2,3".to_owned()),
            ("HF_HOME".to_owned(), "/models".to_owned())
        ]
    );
    // A command with its own arguments, runtime LoRA, prefix caching off, no GPUs.
    let mut g = group();
    g.command = vec![
        "python3".into(),
        "-m".into(),
        "vllm.entrypoints.cli.main".into(),
    ];
    g.lora_modules.clear();
    g.lora_runtime = true;
    g.enable_prefix_caching = false;
    g.max_num_seqs = None;
    g.gpu_memory_utilization = None;
    g.extra_args.clear();
    g.env.clear();
    let l = g.launch(8100, &[]);
    assert_eq!(l.program, "python3");
    assert_eq!(
        l.args.join(" "),
        "-m vllm.entrypoints.cli.main serve meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 \
         --port 8100 --served-model-name llama-8b --tensor-parallel-size 2 \
         --no-enable-prefix-caching --enable-lora"
    );
    assert_eq!(
        l.env,
        [
            ("CUDA_VISIBLE_DEVICES".to_owned(), String::new()),
            (
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING".to_owned(),
                "True".to_owned()
            )
        ]
    );
}

#[test]
fn slots_map_to_ports_and_routes_to_the_advertised_host() {
    let g = group();
    assert_eq!(g.port(0), Some(8100));
    assert_eq!(g.port(1), Some(8101));
    assert_eq!(g.port(2), None);
    assert_eq!(g.replica_name(1), "llama-1");
    assert_eq!(g.host_for_probes(), "127.0.0.1");
    let spec = g
        .provider_spec("3/llama-1".into(), 8101, g.models())
        .unwrap();
    assert_eq!(spec.upstream.base_url(), "http://10.0.0.7:8101/v1");
    assert_eq!(spec.region, "eu-west");
    let names: Vec<&str> = spec.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["llama-8b", "sql"]);
    assert!(spec.prefix_affinity);
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let p = RestartPolicy {
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        ..RestartPolicy::default()
    };
    let waits: Vec<u128> = (1..=5).map(|n| p.backoff(n).as_millis()).collect();
    assert_eq!(waits, [200, 400, 800, 1000, 1000]);
    assert_eq!(RestartPolicy::default().backoff(1), Duration::from_secs(10));
}
