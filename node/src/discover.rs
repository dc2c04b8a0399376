//! Providers found by DNS: a provider with `discover = true` whose `base_url` names many servers
//! (a Kubernetes headless Service: one address per ready pod) becomes one provider per address
//! its host resolves to — id `<id>/<address>`, the URL's host replaced by the address — so
//! that load balancing, breakers and prefix affinity act per server, not per name. The name is
//! looked up again every `discover_every`: a new address joins routing, a gone one leaves it
//! (its calls in flight finish). A failed lookup keeps the providers as they were.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use meridian_actors::{Gateway, ProviderSpec};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, ProviderConfig, ProviderKind};

/// Where the addresses of a name come from (DNS, or a test's list).
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host_port: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The system's resolver.
pub struct Dns;

impl Resolve for Dns {
    fn resolve<'a>(&'a self, host_port: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host(host_port)
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// `base_url` with its host replaced by `ip` (and its port kept, or the scheme's).
fn with_host(base_url: &str, ip: IpAddr) -> Option<String> {
    let uri: http::Uri = base_url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Some(format!("{scheme}://{host}:{port}{}", uri.path()))
}

/// The `HOST:PORT` a provider's `base_url` names.
fn host_port(base_url: &str) -> Option<String> {
    let uri: http::Uri = base_url.parse().ok()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(format!("{}:{port}", uri.host()?))
}

/// The provider of one address.
fn per_address(template: &ProviderConfig, ip: IpAddr) -> Result<ProviderSpec, ConfigError> {
    let mut p = template.clone();
    p.id = format!("{}/{ip}", template.id);
    if let ProviderKind::Api { base_url, .. } = &mut p.kind
        && let Some(url) = with_host(base_url, ip)
    {
        *base_url = url;
    }
    p.to_spec()
}

/// Looks `template`'s name up now (the node serves its providers from the start), then every
/// `every` in the background.
pub async fn start(
    template: ProviderConfig,
    every: Duration,
    gateway: Gateway,
    resolver: Arc<dyn Resolve>,
) -> JoinHandle<()> {
    let mut current = BTreeSet::new();
    look_up(&template, &gateway, resolver.as_ref(), &mut current).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            look_up(&template, &gateway, resolver.as_ref(), &mut current).await;
        }
    })
}

/// One lookup: providers for new addresses, none for gone ones.
async fn look_up(
    template: &ProviderConfig,
    gateway: &Gateway,
    resolver: &dyn Resolve,
    current: &mut BTreeSet<IpAddr>,
) {
    let ProviderKind::Api { base_url, .. } = &template.kind else {
        return;
    };
    let Some(name) = host_port(base_url) else {
        tracing::warn!(provider = %template.id, %base_url, "discover: no host to look up");
        return;
    };
    let found: BTreeSet<IpAddr> = match resolver.resolve(&name).await {
        Ok(ips) => ips.into_iter().collect(),
        Err(e) => {
            tracing::warn!(provider = %template.id, %name, error = %e, "discover: lookup failed; keeping the providers as they are");
            return;
        }
    };
    let registry = gateway.registry();
    for gone in current.difference(&found) {
        registry.withdraw_provider(&format!("{}/{gone}", template.id));
        tracing::info!(provider = %template.id, address = %gone, "discover: address gone; provider withdrawn");
    }
    let mut joined = BTreeSet::new();
    for new in found.difference(current) {
        let added = match per_address(template, *new) {
            Ok(spec) => registry.add_provider(spec).await.map_err(|e| e.message),
            Err(e) => Err(e.to_string()),
        };
        match added {
            Ok(_) => {
                joined.insert(*new);
                tracing::info!(provider = %template.id, address = %new, "discover: new address; provider added");
            }
            Err(e) => {
                tracing::warn!(provider = %template.id, address = %new, error = %e, "discover: cannot add a provider")
            }
        }
    }
    // Only what joined counts as current: a failed add is tried again at the next lookup.
    current.retain(|ip| found.contains(ip));
    current.extend(joined);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Answers with whatever the test set last.
    struct Listed(Mutex<Vec<IpAddr>>);

    impl Resolve for Listed {
        fn resolve<'a>(&'a self, _: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
            let ips = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Box::pin(async move { Ok(ips) })
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter()
            .map(|s| s.parse().expect("an address"))
            .collect()
    }

    #[test]
    fn a_url_gets_each_address_as_its_host() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(
            with_host("http://vllm.ns.svc:8000/v1", v4).as_deref(),
            Some("http://10.1.2.3:8000/v1")
        );
        assert_eq!(
            with_host("https://models.example/v1", v6).as_deref(),
            Some("https://[fd00::7]:443/v1")
        );
        assert_eq!(
            host_port("http://vllm:8000/v1").as_deref(),
            Some("vllm:8000")
        );
    }

    #[tokio::test]
    async fn addresses_that_come_and_go_become_providers_that_come_and_go() {
        let text = "[[providers]]\nid = \"vllm\"\nkind = \"openai\"\nbase_url = \"http://vllm.ns.svc:8000/v1\"\n\
                    models = [\"llama\"]\ndiscover = true\ndiscover_every = \"50ms\"\n";
        let config =
            crate::config::load(Some(text), &Vec::<(String, String)>::new()).expect("valid");
        let template = config.providers[0].clone();
        assert_eq!(template.discover, Some(Duration::from_millis(50)));
        let gateway = Gateway::start(meridian_actors::GatewayConfig::standalone(Vec::new()))
            .await
            .expect("gateway");
        let listed = Arc::new(Listed(Mutex::new(ips(&["10.0.0.1", "10.0.0.2"]))));
        let task = start(
            template,
            Duration::from_millis(50),
            gateway.clone(),
            listed.clone(),
        )
        .await;
        let ids = || {
            let mut ids: Vec<String> = gateway
                .registry()
                .providers()
                .into_iter()
                .map(|p| p.id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(
            ids(),
            ["vllm/10.0.0.1", "vllm/10.0.0.2"],
            "there from the start"
        );
        let first = gateway
            .registry()
            .provider_by_id("vllm/10.0.0.2")
            .expect("provider");
        assert_eq!(first.spec.upstream.base_url(), "http://10.0.0.2:8000/v1");
        // A pod goes, another comes.
        *listed.0.lock().unwrap() = ips(&["10.0.0.2", "10.0.0.3"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while ids() != ["vllm/10.0.0.2", "vllm/10.0.0.3"] {
            assert!(tokio::time::Instant::now() < deadline, "still {:?}", ids());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The one that stayed is the same provider (its queue and counters carry on).
        let kept = gateway
            .registry()
            .provider_by_id("vllm/10.0.0.2")
            .expect("kept");
        assert!(Arc::ptr_eq(&first, &kept));
        task.abort();
    }
}
