//! The two exposition formats `/metrics` speaks: OpenMetrics 1.0.0 text (what
//! `prometheus-client` writes, and what Prometheus asks for first) and the older Prometheus text
//! format 0.0.4 (what `promtool check metrics` and plain-text scrapers read), chosen from the
//! request's `Accept` header.

/// An exposition format, with the `Content-Type` that announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text: counter families named without `_total`, ends with `# EOF`.
    OpenMetrics,
    /// Prometheus text format 0.0.4: counter families named like their `_total` samples.
    Prometheus,
}

const OPENMETRICS_MEDIA_TYPE: &str = "application/openmetrics-text";
const PROMETHEUS_MEDIA_TYPE: &str = "text/plain";

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: the Prometheus text format only when `text/plain`
    /// ranks above OpenMetrics; OpenMetrics otherwise (no header, wildcards, ties, junk).
    pub fn negotiate(accept: Option<&[u8]>) -> Self {
        let Some(accept) = accept.and_then(|accept| std::str::from_utf8(accept).ok()) else {
            return Self::OpenMetrics;
        };
        let (mut openmetrics, mut prometheus) = (0.0_f64, 0.0_f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next().unwrap_or_default();
            let quality = parts
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, q)| q.trim().parse::<f64>().ok())
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
            if media_type.eq_ignore_ascii_case(OPENMETRICS_MEDIA_TYPE) {
                openmetrics = openmetrics.max(quality);
            } else if media_type.eq_ignore_ascii_case(PROMETHEUS_MEDIA_TYPE) {
                prometheus = prometheus.max(quality);
            }
        }
        if prometheus > openmetrics {
            Self::Prometheus
        } else {
            Self::OpenMetrics
        }
    }

    /// `openmetrics` (an OpenMetrics text exposition) in this format.
    ///
    /// The Prometheus text format differs from OpenMetrics in what we write only in naming:
    /// a counter family `x` is announced as `x_total` (its samples already are), and there is
    /// no `# EOF` (nor `# UNIT`). Samples and label escaping are the same in both.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Self::OpenMetrics => openmetrics,
            Self::Prometheus => to_prometheus_text(&openmetrics),
        }
    }
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|keyword| {
            let rest = line.strip_prefix(keyword)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(&name)
                .then(|| format!("{keyword}{name}_total {tail}"))
        });
        match descriptor {
            Some(renamed) => out.push_str(renamed.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_from_accept() {
        let prometheus_scrape = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,\
            text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, expected) in [
            (None, Format::OpenMetrics),
            (Some("*/*"), Format::OpenMetrics),
            (Some(prometheus_scrape), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (Some("text/plain"), Format::Prometheus),
            (Some("text/plain;version=0.0.4"), Format::Prometheus),
            (Some("TEXT/PLAIN; charset=utf-8"), Format::Prometheus),
            (Some("text/plain, */*;q=0.1"), Format::Prometheus),
            (
                Some("application/openmetrics-text;q=0.2, text/plain;q=0.9"),
                Format::Prometheus,
            ),
            (
                Some("application/openmetrics-text, text/plain"),
                Format::OpenMetrics,
            ),
            (Some("text/plain;q=0"), Format::OpenMetrics),
            (Some("text/plain;q=nope"), Format::OpenMetrics),
            (Some("text/plain;q=7"), Format::OpenMetrics),
            (Some("application/json"), Format::OpenMetrics),
            (Some(""), Format::OpenMetrics),
        ] {
            assert_eq!(
                Format::negotiate(accept.map(str::as_bytes)),
                expected,
                "{accept:?}"
            );
        }
        assert_eq!(Format::negotiate(Some(b"\xff")), Format::OpenMetrics);
    }

    #[test]
    fn renders_prometheus_text() {
        for (openmetrics, expected) in [
            ("# EOF\n", ""),
            (
                "# HELP a_x Counts x.\n# TYPE a_x counter\na_x_total{k=\"v\"} 3\n# EOF\n",
                "# HELP a_x_total Counts x.\n# TYPE a_x_total counter\na_x_total{k=\"v\"} 3\n",
            ),
            (
                "# HELP g Is g.\n# TYPE g gauge\ng 1\n# EOF\n",
                "# HELP g Is g.\n# TYPE g gauge\ng 1\n",
            ),
            (
                "# HELP a_x \n# TYPE a_x counter\n# UNIT a_x bytes\na_x_total 0\n# EOF\n",
                "# HELP a_x_total\n# TYPE a_x_total counter\na_x_total 0\n",
            ),
            // Only whole family names are renamed.
            (
                "# HELP a_xy Not x.\n# TYPE a_xy gauge\n# TYPE a_x counter\na_xy 2\n",
                "# HELP a_xy Not x.\n# TYPE a_xy gauge\n# TYPE a_x_total counter\na_xy 2\n",
            ),
        ] {
            assert_eq!(
                Format::Prometheus.render(openmetrics.to_owned()),
                expected,
                "{openmetrics:?}"
            );
            assert_eq!(
                Format::OpenMetrics.render(openmetrics.to_owned()),
                openmetrics
            );
        }
    }
}
