//! Reading counters out of a Prometheus text page (the relay's, the gateway's, the workers').

/// Sums every sample of metric `name` (all label sets) in Prometheus text `page`, rounded to a
/// whole count (these are counters).
pub fn sum(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            // `name{...} v` or `name v`, never `name_suffix v`.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum::<f64>()
        .round() as u64
}

/// Fetches `url` and sums metric `name`; 0 when the page cannot be read.
pub async fn scrape(client: &reqwest::Client, url: &str, name: &str) -> u64 {
    match client.get(url).send().await {
        Ok(r) => match r.text().await {
            Ok(t) => sum(&t, name),
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_label_sets_and_ignores_longer_names() {
        let page = "# TYPE x_total counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_other 9\nx_total 1\n";
        assert_eq!(super::sum(page, "x_total"), 6);
    }
}
