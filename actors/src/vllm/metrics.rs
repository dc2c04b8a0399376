//! The few series of a vLLM replica's `/metrics` (Prometheus text) that routing and the
//! hang watchdog read.

/// What a replica's engine says about itself, summed over its series (engines, model names).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineMetrics {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (0.0–1.0; the older `vllm:gpu_cache_usage_perc` when the
    /// new name is absent). The largest over engines.
    pub kv_cache_usage: f64,
    /// `vllm:generation_tokens_total`: progress, for the hang watchdog.
    pub generation_tokens: f64,
    /// `vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_cache_queries: f64,
    pub prefix_cache_hits: f64,
    /// `vllm:time_to_first_token_seconds` (a histogram): its sum and count, the engine's own
    /// time to first token since it started.
    pub ttft_seconds_sum: f64,
    pub ttft_count: f64,
}

impl EngineMetrics {
    /// Reads the series it knows from an exposition text; other lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        let mut old_kv: Option<f64> = None;
        let mut new_kv: Option<f64> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = sample(line) else {
                continue;
            };
            match name {
                "vllm:num_requests_running" => m.running += value,
                "vllm:num_requests_waiting" => m.waiting += value,
                "vllm:kv_cache_usage_perc" => new_kv = Some(new_kv.unwrap_or(0.0).max(value)),
                "vllm:gpu_cache_usage_perc" => old_kv = Some(old_kv.unwrap_or(0.0).max(value)),
                "vllm:generation_tokens_total" => m.generation_tokens += value,
                "vllm:prefix_cache_queries_total" | "vllm:gpu_prefix_cache_queries_total" => {
                    m.prefix_cache_queries += value;
                }
                "vllm:prefix_cache_hits_total" | "vllm:gpu_prefix_cache_hits_total" => {
                    m.prefix_cache_hits += value;
                }
                "vllm:time_to_first_token_seconds_sum" => m.ttft_seconds_sum += value,
                "vllm:time_to_first_token_seconds_count" => m.ttft_count += value,
                _ => {}
            }
        }
        m.kv_cache_usage = new_kv.or(old_kv).unwrap_or(0.0);
        m
    }

    /// Prefix-cache hits over lookups since the replica started (0 without lookups).
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        if self.prefix_cache_queries > 0.0 {
            self.prefix_cache_hits / self.prefix_cache_queries
        } else {
            0.0
        }
    }
}

/// A sample line's metric name and value: `name{labels} value [timestamp]`. Label values may
/// hold spaces and braces inside their quotes.
fn sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let (mut quoted, mut escaped) = (false, false);
        let close = rest.char_indices().find_map(|(i, c)| {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => return Some(i),
                _ => {}
            }
            None
        })?;
        rest = &rest[close + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_routing_series_of_a_v1_exposition() {
        let text = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"llama-8b\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"llama-8b\"} 2.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"llama-8b\"} 4.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"llama-8b\"} 0.41
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"llama-8b\"} 0.63
vllm:generation_tokens_total{engine=\"0\",model_name=\"llama-8b\"} 18234.0
vllm:generation_tokens_created{engine=\"0\",model_name=\"llama-8b\"} 1.7637e+09
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"llama-8b\"} 1000.0
vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"llama-8b\"} 250.0
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"llama-8b\"} 42.0
vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"llama-8b\"} 6.3
vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"llama-8b\"} 42.0
vllm:time_to_first_token_seconds_count{engine=\"1\",model_name=\"llama-8b\"} 8.0
vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7637e+09
";
        let m = EngineMetrics::parse(text);
        assert_eq!(m.running, 5.0);
        assert_eq!(m.waiting, 4.0);
        assert_eq!(m.kv_cache_usage, 0.63);
        assert_eq!(m.generation_tokens, 18234.0);
        assert_eq!(m.prefix_cache_hit_rate(), 0.25);
        assert_eq!((m.ttft_seconds_sum, m.ttft_count), (6.3, 50.0));
    }

    #[test]
    fn falls_back_to_the_old_kv_name_and_survives_odd_lines() {
        let text = "\
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5
vllm:num_requests_running{model_name=\"a } b\"} 1
vllm:num_requests_waiting 2 1700000000000
not a sample
vllm:num_requests_running{model_name=\"x\"} NaN-ish
";
        let m = EngineMetrics::parse(text);
        assert_eq!(m.kv_cache_usage, 0.5);
        assert_eq!(m.running, 1.0);
        assert_eq!(m.waiting, 2.0);
        // Only the new name counts when both are there.
        let both =
            EngineMetrics::parse("vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\n");
        assert_eq!(both.kv_cache_usage, 0.2);
    }
}
