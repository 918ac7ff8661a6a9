//! What the alert rules and the dashboard ask Prometheus for: the metric names (with the
//! scrape job they select) in PromQL expressions, the expressions of a rules file and of a
//! Grafana dashboard, and the sample names a `/metrics` exposition makes Prometheus store.
//! Pure text work, so a renamed metric is caught without a Prometheus server.

use std::collections::BTreeSet;

use serde_json::Value;

/// One metric an expression selects, and the job its matchers pin it to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MetricRef {
    pub name: String,
    /// The value of a `job="…"` matcher; `None` without one (or with a regex).
    pub job: Option<String>,
}

/// Words of PromQL that are not metric names when they stand without `(`: aggregation
/// operators (before `by`/`without`), set and logical operators, modifiers (and the words of
/// [`LABEL_LISTS`]).
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "atan2",
];

/// Words followed by a parenthesised list of label names, not of expressions.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The index just past the string literal opening at `i` (quote `q`), escapes honoured.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let q = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != q {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// The index just past the `close` that matches the `open` at `i`, strings skipped.
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The `job="…"` matcher of a selector's `{…}` body, if it has one.
fn job_matcher(body: &str) -> Option<String> {
    body.match_indices("job").find_map(|(at, _)| {
        let whole_word = body[..at].chars().next_back().is_none_or(|c| !is_ident(c));
        let value = body[at + 3..].trim_start().strip_prefix('=')?;
        if !whole_word || value.starts_with('~') {
            return None;
        }
        let value = value.trim_start().strip_prefix('"')?;
        Some(value[..value.find('"')?].to_owned())
    })
}

/// Every metric an expression selects. Grafana's `$variables` are ignored.
pub fn metric_refs(expr: &str) -> Vec<MetricRef> {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i);
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable, a number or a duration: one token.
            i += 1;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let follows = chars.get(next).copied();
            if LABEL_LISTS.contains(&word.as_str()) && follows == Some('(') {
                i = skip_group(&chars, next, '(', ')');
            } else if follows == Some('(')
                || KEYWORDS.contains(&word.as_str())
                || LABEL_LISTS.contains(&word.as_str())
            {
                // A function or an operator.
            } else if follows == Some('{') {
                let end = skip_group(&chars, next, '{', '}');
                let body: String = chars[next + 1..end.saturating_sub(1)].iter().collect();
                refs.push(MetricRef {
                    name: word,
                    job: job_matcher(&body),
                });
                i = end;
            } else {
                refs.push(MetricRef {
                    name: word,
                    job: None,
                });
            }
        } else {
            i += 1;
        }
    }
    refs
}

/// The `expr` of every rule of a Prometheus rules file (plain or block scalars, as written
/// by hand), and how many `- alert:`/`- record:` rules the file has, to compare.
pub fn rule_exprs(yaml: &str) -> (Vec<String>, usize) {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut rules = 0;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let key = line.trim_start().trim_start_matches("- ");
        if key.starts_with("alert:") || key.starts_with("record:") {
            rules += 1;
        }
        if let Some(value) = key.strip_prefix("expr:") {
            let value = value.trim();
            if matches!(value, ">" | ">-" | "|" | "|-") {
                let own = indent(line);
                let mut body = Vec::new();
                i += 1;
                while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > own) {
                    body.push(lines[i].trim());
                    i += 1;
                }
                exprs.push(body.join(" ").trim().to_owned());
                continue;
            }
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            exprs.push(unquoted.to_owned());
        }
        i += 1;
    }
    (exprs, rules)
}

/// The query of every target of every panel of a Grafana dashboard (rows' panels included).
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_owned());
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The sample names Prometheus stores from an OpenMetrics exposition, from its `# TYPE`
/// lines (so families without a sample yet count too): `name_total` for a counter,
/// `name_bucket`, `name_sum`, `name_count` for a histogram, `name` otherwise.
pub fn exposed_samples(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap_or_default();
            let suffixes: &[&str] = match parts.next() {
                Some("counter") => &["_total"],
                Some("histogram") => &["_bucket", "_sum", "_count"],
                Some("summary") => &["", "_sum", "_count"],
                _ => &[""],
            };
            suffixes
                .iter()
                .map(move |s| format!("{name}{s}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<(String, Option<String>)> {
        metric_refs(expr)
            .into_iter()
            .map(|r| (r.name, r.job))
            .collect()
    }

    fn r(name: &str, job: Option<&str>) -> (String, Option<String>) {
        (name.to_owned(), job.map(str::to_owned))
    }

    #[test]
    fn finds_metrics_not_functions_operators_or_label_lists() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{job="lab-api"}[$__rate_interval]))) > 0.5"#
            ),
            [r("http_request_duration_seconds_bucket", Some("lab-api"))]
        );
        assert_eq!(
            names(
                r#"time() - max(sync_last_cycle_end_timestamp_seconds{job="sync-daemon"}) > 2 * max(sync_interval_seconds)"#
            ),
            [
                r("sync_last_cycle_end_timestamp_seconds", Some("sync-daemon")),
                r("sync_interval_seconds", None)
            ]
        );
        assert_eq!(
            names(r#"(sum(sync_lease_held{job="sync-daemon"}) or vector(0)) < 1"#),
            [r("sync_lease_held", Some("sync-daemon"))]
        );
        assert_eq!(
            names(r#"absent(up{job="lab-api"}) or absent(up{job=~"a|b"}) unless on (job) foo"#),
            [r("up", Some("lab-api")), r("up", None), r("foo", None)]
        );
    }

    #[test]
    fn strings_ranges_and_variables_hide_nothing_and_add_nothing() {
        assert_eq!(
            names(
                r#"sum by (kind) (increase(x_total{job = "sync-daemon", kind=~"a{b}"}[1h] offset 5m)) / y"#
            ),
            [r("x_total", Some("sync-daemon")), r("y", None)]
        );
        assert_eq!(names(r#"z{notjob="lab-api", subjob="x"}"#), [r("z", None)]);
        assert_eq!(
            names(r#"z{notjob="x", job="lab-api"}"#),
            [r("z", Some("lab-api"))]
        );
        assert_eq!(names("$__interval"), []);
    }

    #[test]
    fn rule_exprs_reads_block_and_plain_scalars() {
        let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: >-\n          sum(a)\n          > 1\n        for: 5m\n      - alert: B\n        expr: b > 0\n      - record: c:rate\n        expr: 'rate(c[5m])'\n";
        let (exprs, rules) = rule_exprs(yaml);
        assert_eq!(exprs, ["sum(a) > 1", "b > 0", "rate(c[5m])"]);
        assert_eq!(rules, 3);
    }

    #[test]
    fn dashboard_exprs_walks_rows() {
        let d = serde_json::json!({"panels": [
            {"type": "row", "panels": [{"targets": [{"expr": "a"}]}]},
            {"targets": [{"expr": "b"}, {"expr": "c"}]},
        ]});
        assert_eq!(dashboard_exprs(&d), ["a", "b", "c"]);
    }

    #[test]
    fn exposed_samples_follow_openmetrics_suffixes() {
        let text = "# TYPE a counter\n# HELP a A\n# TYPE b gauge\n# TYPE c_seconds histogram\nb 1\n# EOF\n";
        let got: Vec<String> = exposed_samples(text).into_iter().collect();
        assert_eq!(
            got,
            [
                "a_total",
                "b",
                "c_seconds_bucket",
                "c_seconds_count",
                "c_seconds_sum"
            ]
        );
    }
}
