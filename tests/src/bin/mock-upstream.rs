//! The mock upstream as a process: `mock-upstream [--listen ADDR] [--flavor vllm|openai|anthropic]
//! [--model NAME] [--api-key KEY]`. Prints `mock-upstream listening on ADDR` once it accepts connections.

use clap::Parser;
use meridian_tests::mock::{Flavor, MockOptions, MockUpstream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "vllm")]
    flavor: String,
    #[arg(long, default_value = "mock")]
    model: String,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let flavor = match args.flavor.as_str() {
        "vllm" => Flavor::Vllm,
        "openai" => Flavor::OpenAi,
        "anthropic" => Flavor::Anthropic,
        other => anyhow::bail!("--flavor must be vllm, openai or anthropic, got {other:?}"),
    };
    let mock = MockUpstream::start(MockOptions {
        listen: args.listen,
        flavor,
        served_model: args.model,
        api_key: args.api_key,
        ..MockOptions::default()
    })
    .await?;
    println!("mock-upstream listening on {}", mock.addr);
    mock.wait().await;
    Ok(())
}
