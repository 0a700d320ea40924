//! Reading a `/metrics` page (Prometheus text format) the way Prometheus does, so that tests
//! can look up one series by its name and labels.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Scrapes the `/metrics` page of the process listening at `addr`.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let response = crate::http_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("a /metrics response");
    assert_eq!(response.status(), 200, "GET /metrics");
    Scrape::parse(&response.text().await.expect("the /metrics page"))
}

/// One scrape: every sample by name and labels, and the names declared with `# TYPE`.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    pub declared: BTreeSet<String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut scrape = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    scrape.declared.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = parse_series(series);
            scrape.samples.insert((name, labels), value);
        }
        scrape
    }

    /// The value of the series `name` with exactly these labels (0 when absent).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether a series `name` with exactly these labels exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.contains_key(&(name.to_owned(), labels))
    }

    /// The sum of every series `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn parse_series(series: &str) -> (String, BTreeMap<String, String>) {
    let Some(open) = series.find('{') else {
        return (series.to_owned(), BTreeMap::new());
    };
    let name = series[..open].to_owned();
    let mut labels = BTreeMap::new();
    let mut chars = series[open + 1..].chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim_start_matches(',')
            .trim()
            .to_owned();
        if key.is_empty() || key == "}" {
            break;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "a quoted label value in {series:?}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        if chars.peek() == Some(&'}') {
            break;
        }
    }
    (name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let scrape = Scrape::parse(
            "# TYPE stitch_http_requests_total counter\n\
             stitch_http_requests_total{method=\"GET\",route=\"/upload/{id}/status\",status=\"200\"} 3\n\
             stitch_chunk_bytes_received_total 1048576\n\
             stitch_x_bucket{le=\"+Inf\",a=\"q\\\"uote,d\"} 2\n",
        );
        assert!(scrape.declared.contains("stitch_http_requests_total"));
        assert_eq!(
            scrape.value(
                "stitch_http_requests_total",
                &[
                    ("route", "/upload/{id}/status"),
                    ("method", "GET"),
                    ("status", "200")
                ]
            ),
            3.0
        );
        assert_eq!(
            scrape.value("stitch_chunk_bytes_received_total", &[]),
            1048576.0
        );
        assert_eq!(
            scrape.value("stitch_x_bucket", &[("le", "+Inf"), ("a", "q\"uote,d")]),
            2.0
        );
        assert_eq!(
            scrape.sum("stitch_http_requests_total", &[("status", "200")]),
            3.0
        );
        assert!(!scrape.has("stitch_http_requests_total", &[("status", "200")]));
    }
}
