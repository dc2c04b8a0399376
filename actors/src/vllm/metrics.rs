//! The few series of a vLLM replica's `/metrics` (Prometheus text) that routing and the
//! hang watchdog read.

/// What a replica's engine says about itself, summed over its series (engines, model names).
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// `vllm:time_to_first_token_seconds`: the engine's own time to first token since it
    /// started, a histogram with the engine's buckets.
    pub ttft: EngineHistogram,
}

/// A histogram an engine exposes, summed over its series (engines, model names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineHistogram {
    pub sum: f64,
    pub count: f64,
    /// Cumulative counts by upper bound (`le`), in increasing order; the last is `+Inf`.
    pub buckets: Vec<(f64, f64)>,
}

impl EngineHistogram {
    /// Adds one series' bucket line.
    fn add_bucket(&mut self, le: f64, count: f64) {
        match (self.buckets).binary_search_by(|(b, _)| b.total_cmp(&le)) {
            Ok(i) => self.buckets[i].1 += count,
            Err(i) => self.buckets.insert(i, (le, count)),
        }
    }

    /// The count in each bucket alone (not cumulative), as Prometheus encoders take them.
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        let mut below = 0.0;
        (self.buckets.iter())
            .map(|&(le, cumulative)| {
                let own = (cumulative - below).max(0.0);
                below = cumulative.max(below);
                (le, own as u64)
            })
            .collect()
    }
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
                "vllm:time_to_first_token_seconds_sum" => m.ttft.sum += value,
                "vllm:time_to_first_token_seconds_count" => m.ttft.count += value,
                "vllm:time_to_first_token_seconds_bucket" => {
                    if let Some(le) = label(line, "le").and_then(|v| parse_value(&v)) {
                        m.ttft.add_bucket(le, value);
                    }
                }
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
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some((name, value))
}

/// A sample value or an `le` bound as the exposition format writes it.
fn parse_value(value: &str) -> Option<f64> {
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        v => v.parse().ok(),
    }
}

/// The value of label `key` of a sample line, unescaped (`None` if the line has no such
/// label).
fn label(line: &str, key: &str) -> Option<String> {
    let open = line.find('{')?;
    let mut rest = &line[open + 1..];
    loop {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        // The exposition format allows blanks around `=`.
        let quoted = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let at = rest.len() - quoted.len();
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return None;
        }
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(at + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if name == key {
            return Some(value);
        }
        rest = rest[end..].trim_start_matches([' ', '\t']);
        if rest.starts_with('}') {
            return None;
        }
    }
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
        assert_eq!((m.ttft.sum, m.ttft.count), (6.3, 50.0));
        assert_eq!(m.ttft.buckets, [(f64::INFINITY, 42.0)]);
    }

    #[test]
    fn sums_a_histograms_buckets_over_engines_and_gives_each_buckets_own_count() {
        let text = "\
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.1\",model_name=\"m\"} 3.0
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.5\",model_name=\"m\"} 5.0
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 6.0
vllm:time_to_first_token_seconds_bucket{model_name=\"a \\\"quoted\\\" {name}\",le=\"0.1\",engine=\"1\"} 1.0
vllm:time_to_first_token_seconds_bucket{model_name=\"a \\\"quoted\\\" {name}\",le=\"0.5\",engine=\"1\"} 1.0
vllm:time_to_first_token_seconds_bucket{model_name=\"a \\\"quoted\\\" {name}\",le=\"+Inf\",engine=\"1\"} 2.0
vllm:time_to_first_token_seconds_bucket{engine=\"2\",model_name=\"m\"} 9.0
";
        let m = EngineMetrics::parse(text);
        assert_eq!(
            m.ttft.buckets,
            [(0.1, 4.0), (0.5, 6.0), (f64::INFINITY, 8.0)],
            "a line without `le` is skipped"
        );
        assert_eq!(
            m.ttft.per_bucket(),
            [(0.1, 4), (0.5, 2), (f64::INFINITY, 2)]
        );
        assert_eq!(
            label(r#"x{a="1",b="x\"y"} 2"#, "b").as_deref(),
            Some("x\"y")
        );
        assert_eq!(label("x 2", "b"), None);
        assert_eq!(
            label("x{a = \"1\" ,\tle= \"0.5\"} 2", "le").as_deref(),
            Some("0.5")
        );
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
