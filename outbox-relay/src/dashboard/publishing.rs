//! The publishing section: rates and latency quantiles read from the relay's own Prometheus
//! text, so the page shows what `/metrics` shows.

use std::time::Instant;

use super::Dashboard;

use super::html::*;

pub(super) fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
}

/// The upper bound of the bucket holding quantile `q` of a histogram, from its `le` buckets.
pub(super) fn quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples(text)
        .filter(|(n, _, _)| *n == bucket)
        .filter_map(|(_, labels, v)| {
            let le = labels.split(',').find_map(|l| l.strip_prefix("le=\""))?;
            let le = le.trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

pub(super) fn sum(text: &str, name: &str) -> f64 {
    samples(text)
        .filter(|(n, _, _)| *n == name)
        .map(|(_, _, v)| v)
        .sum()
}

pub(super) fn seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_infinite() => "&gt; 10 s".into(),
        Some(s) if s < 1.0 => format!("≤ {:.1} ms", s * 1000.0),
        Some(s) => format!("≤ {s:.1} s"),
        None => "–".into(),
    }
}

pub(super) fn publishing(state: &Dashboard) -> String {
    let Some(handle) = &state.metrics else {
        return "<section id=publishing><h2>Publishing</h2>\
                <p class=empty>Metrics are not installed in this process.</p></section>"
            .into();
    };
    let text = handle.render();
    let published = sum(&text, "outbox_relay_published_total");
    let failed_attempts = sum(&text, "outbox_relay_failed_attempts_total");
    let dead = sum(&text, "outbox_relay_dead_lettered_total");
    let now = Instant::now();
    let rate = {
        let mut last = state
            .last_published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rate = last.and_then(|(at, before)| {
            let dt = now.duration_since(at).as_secs_f64();
            (dt >= 0.5).then(|| (published - before).max(0.0) / dt)
        });
        // Keep the older sample until half a second has passed, so quick reloads still measure.
        if rate.is_some() || last.is_none() {
            *last = Some((now, published));
        }
        rate
    };
    let latency = "outbox_relay_enqueue_to_confirm_seconds";
    let count = sum(&text, &format!("{latency}_count"));
    let mean = (count > 0.0).then(|| sum(&text, &format!("{latency}_sum")) / count);
    let fig = |value: String, label: &str| {
        format!(
            "<div class=fig><b>{value}</b><span>{}</span></div>",
            esc(label)
        )
    };
    format!(
        "<section id=publishing><h2>Publishing (this relay process)</h2><div class=figs>{}{}{}{}{}{}{}</div></section>",
        fig(
            rate.map(|r| format!("{r:.1}/s"))
                .unwrap_or_else(|| "–".into()),
            "publish rate since the last view"
        ),
        fig(format!("{published:.0}"), "published since start"),
        fig(format!("{failed_attempts:.0}"), "failed attempts"),
        fig(format!("{dead:.0}"), "dead-lettered"),
        fig(
            mean.map(|m| format!("{:.1} ms", m * 1000.0))
                .unwrap_or_else(|| "–".into()),
            "mean enqueue → confirm"
        ),
        fig(
            seconds(quantile(&text, latency, 0.5)),
            "p50 enqueue → confirm"
        ),
        fig(
            seconds(quantile(&text, latency, 0.99)),
            "p99 enqueue → confirm"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_reads_cumulative_buckets() {
        let text = "# TYPE h histogram\n\
                    h_bucket{le=\"0.001\"} 10\n\
                    h_bucket{le=\"0.01\"} 90\n\
                    h_bucket{le=\"0.1\"} 100\n\
                    h_bucket{le=\"+Inf\"} 100\n\
                    h_sum 0.5\nh_count 100\n";
        assert_eq!(quantile(text, "h", 0.5), Some(0.01));
        assert_eq!(quantile(text, "h", 0.99), Some(0.1));
        assert_eq!(quantile(text, "none", 0.5), None);
        assert_eq!(sum(text, "h_count"), 100.0);
    }
}
