//! Routing a request: which of its model's providers to try and in what order (virtual
//! models resolved, the tenant's models and regions enforced, open breakers and vLLM's own
//! fields taken into account), and the checks a cached answer must pass.

use super::*;

impl Gateway {
    /// The providers to try, best first, and how many of the model's were left out. A
    /// virtual model (`auto`) is resolved first: the request's complexity picks a list of
    /// models, whose providers are tried in the list's order.
    pub(super) fn route(
        &self,
        request: &ChatRequest,
        complexity: Option<Complexity>,
        request_id: &RequestId,
        tenant: &TenantRules,
    ) -> Result<(Vec<Route>, usize), ApiError> {
        let model = request.model();
        let not_found = || {
            ApiError::new(
                ErrorKind::NotFound,
                format!("The model `{model}` does not exist or is not served by this node."),
            )
            .with_param("model")
            .with_code("model_not_found")
        };
        let (regions, allowed) = (&tenant.regions, &tenant.models);
        let may_call = |m: &str| allowed.is_empty() || allowed.iter().any(|a| a == m);
        let table = self.inner.registry.table();
        let models: Vec<&str> = match table.aliases.get(model) {
            Some(alias) => {
                let complexity = route::classify(
                    &alias.rules,
                    Signals {
                        prompt_tokens: estimate::prompt_tokens(
                            request,
                            &Default::default(),
                            estimate::DEFAULT_IMAGE_TOKENS,
                        ),
                        has_code: request
                            .params
                            .messages
                            .iter()
                            .any(|m| m.text().contains("```")),
                        has_tools: request
                            .body
                            .get("tools")
                            .and_then(|t| t.as_array())
                            .is_some_and(|t| !t.is_empty()),
                        explicit: complexity,
                    },
                );
                tracing::debug!(
                    request_id = %request_id,
                    alias = model,
                    complexity = complexity.as_str(),
                    "virtual model resolved"
                );
                alias
                    .models(complexity)
                    .iter()
                    .map(String::as_str)
                    .filter(|m| may_call(m))
                    .collect()
            }
            None if may_call(model) => vec![model],
            None => Vec::new(),
        };
        if models.is_empty() {
            if !table.models.iter().any(|m| m == model) {
                return Err(not_found());
            }
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                format!("this tenant may not call the model `{model}`"),
            )
            .with_param("model")
            .with_code("model_not_allowed"));
        }
        let prefix = table.affinity.then(|| prefix_key(request));
        let mut chosen = Vec::new();
        let mut ejected = 0;
        let mut refusal = None;
        for m in models {
            let Some(routes) = table.routes.get(m) else {
                continue;
            };
            match self.plan(routes, regions, prefix) {
                Ok((order, e)) => {
                    chosen.extend(order);
                    ejected += e;
                }
                Err(no) => refusal = Some(no),
            }
        }
        // vLLM's own fields go only to providers that take them.
        if let Some(field) = request.engine_field()
            && !chosen.is_empty()
        {
            chosen.retain(|r| r.provider.spec.upstream.takes_engine_fields(request));
            if chosen.is_empty() {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "`{field}` is one of vLLM's own parameters, and no provider of `{model}` this request may use takes it (they speak another API); send it to a model served by vLLM"
                    ),
                )
                .with_code("unsupported_parameter"));
            }
        }
        if !chosen.is_empty() {
            return Ok((chosen, ejected));
        }
        Err(match refusal {
            None if self.inner.registry.awaited_models().iter().any(|m| m == model) => ApiError::new(
                ErrorKind::Unavailable,
                format!("no replica of `{model}` is ready yet (its vLLM servers are starting or restarting)"),
            )
            .with_code("no_ready_replica")
            .with_retry_after(Duration::from_secs(5)),
            None => not_found(),
            Some(NoRoute::Residency) => ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "no provider of `{model}` is in a region this tenant allows ({})",
                    regions.join(", ")
                ),
            )
            .with_code("no_provider_in_allowed_regions")
            .no_retry(),
            Some(NoRoute::AllEjected) => ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "every provider of `{model}` this tenant may use is ejected by its circuit breaker; retry shortly"
                ),
            )
            .with_code("circuit_open")
            .with_retry_after(Duration::from_secs(1)),
        })
    }

    /// Whether a cached answer to `request` may be served to `principal`: the model is still
    /// served, the tenant may call it, and one of its providers is in the tenant's regions (open
    /// breakers aside: a cached answer needs no provider).
    pub(crate) fn may_serve_cached(
        &self,
        principal: Option<&Principal>,
        request: &ChatRequest,
        complexity: Option<Complexity>,
        request_id: &RequestId,
    ) -> Result<(), ApiError> {
        let tenant = self.tenant_rules(principal);
        match self.route(request, complexity, request_id, &tenant) {
            Err(e) if e.code.as_deref() != Some("circuit_open") => Err(e),
            _ => Ok(()),
        }
    }

    /// Refuses a request that sends an engine-specific field (see
    /// [`meridian_proto::openai::RESTRICTED_FIELDS`]) its tenant was not granted. With
    /// authentication off there is no tenant to grant them, and nothing is refused.
    pub(crate) fn check_engine_fields(
        &self,
        principal: Option<&Principal>,
        request: &ChatRequest,
    ) -> Result<(), ApiError> {
        let (Some(p), Some(c)) = (principal, &self.inner.cluster) else {
            return Ok(());
        };
        // Most requests send none of them: the tenant record is read only when one does.
        if request.restricted_field(&[]).is_none() {
            return Ok(());
        }
        let state = c.state.borrow();
        let granted = state
            .tenants
            .get(&*p.tenant)
            .map_or(&[][..], |t| &t.engine_fields[..]);
        match request.restricted_field(granted) {
            None => Ok(()),
            Some(field) => Err(ApiError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "`{field}` changes how the engine schedules, templates or decodes the request; this tenant may not send it"
                ),
            )
            .with_param(field)
            .with_code("field_not_allowed")),
        }
    }

    /// What the caller's tenant record says about routing it (no restriction, weight 1, for
    /// callers without a tenant record). One read of the applied state per request.
    pub(super) fn tenant_rules(&self, principal: Option<&Principal>) -> TenantRules {
        let (Some(p), Some(c)) = (principal, &self.inner.cluster) else {
            return TenantRules::default();
        };
        c.state
            .borrow()
            .tenants
            .get(&*p.tenant)
            .map_or_else(TenantRules::default, |t| TenantRules {
                regions: t.regions.clone(),
                models: t.models.clone(),
                weight: t.weight.max(1),
            })
    }

    /// One model's providers in the order to try them (see [`route::plan`]), and how many of
    /// its providers were left out (open breakers, outside the tenant's regions).
    fn plan(
        &self,
        routes: &[Route],
        regions: &[String],
        prefix: Option<u64>,
    ) -> Result<(Vec<Route>, usize), NoRoute> {
        let gates: Vec<Gate> = match &self.inner.cluster {
            Some(c) if routes.iter().any(|r| r.breaker.is_some()) => {
                let state = c.state.borrow();
                routes
                    .iter()
                    .map(|r| r.breaker.as_ref().map_or(Gate::Closed, |b| b.gate(&state)))
                    .collect()
            }
            _ => vec![Gate::Closed; routes.len()],
        };
        let candidates: Vec<Candidate<'_>> = routes
            .iter()
            .zip(&gates)
            .map(|(r, &breaker)| Candidate {
                region: &r.provider.spec.region,
                load: Load {
                    in_flight: r.provider.in_flight(),
                    queued: r.provider.queued(),
                    max_concurrency: r.provider.spec.max_concurrency,
                    weight: r.provider.spec.weight,
                    price: r.provider.spec.price.input + r.provider.spec.price.output,
                    engine_running: r.provider.upstream_load().running(),
                    engine_waiting: r.provider.upstream_load().waiting(),
                    kv_permille: (r.provider.upstream_load().kv_cache_usage() * 1000.0) as u32,
                },
                breaker,
                affinity: r
                    .provider
                    .spec
                    .prefix_affinity
                    .then_some(r.provider.spec.id.as_str()),
            })
            .collect();
        let order = route::plan(
            &candidates,
            &self.inner.region,
            regions,
            self.random(),
            prefix,
        )?;
        // Left out: open breakers, and providers outside the tenant's regions.
        let ejected = candidates.len() - order.len();
        Ok((
            order.into_iter().map(|i| routes[i].clone()).collect(),
            ejected,
        ))
    }

    /// A well-mixed number for the routing draw (splitmix64 over a counter: cheap, lock-free,
    /// and good enough to spread picks; nothing depends on it being unpredictable).
    fn random(&self) -> u64 {
        let mut z = self
            .inner
            .draws
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The prefix-affinity key of a request: a hash of the start of its conversation — the leading
/// system messages and the first user message, up to 2 KiB of text — which stays the same as
/// the conversation grows turn by turn.
/// A text completion's is the start of its first prompt; an embedding has none worth keeping.
pub(super) fn prefix_key(request: &ChatRequest) -> u64 {
    const PREFIX: usize = 2048;
    let mut text = Vec::with_capacity(PREFIX);
    if let Some(Input::Text(prompt)) = request.inputs.first() {
        text.extend_from_slice(prompt.as_bytes());
    }
    for m in &request.params.messages {
        text.extend_from_slice(m.role.as_str().as_bytes());
        text.push(b':');
        text.extend_from_slice(m.text().as_bytes());
        text.push(b'\n');
        let opening = matches!(m.role, Role::System | Role::Developer);
        if !opening || text.len() >= PREFIX {
            break;
        }
    }
    text.truncate(PREFIX);
    route::fnv1a(&text)
}

/// A tenant's routing rules, read from its replicated record.
#[derive(Debug)]
pub(super) struct TenantRules {
    /// Allowed regions (empty: any).
    pub(super) regions: Vec<String>,
    /// Allowed models (empty: any).
    pub(super) models: Vec<String>,
    /// Share of provider queues.
    pub(super) weight: u32,
}

impl Default for TenantRules {
    fn default() -> Self {
        Self {
            regions: Vec::new(),
            models: Vec::new(),
            weight: 1,
        }
    }
}
