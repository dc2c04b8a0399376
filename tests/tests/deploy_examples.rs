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
