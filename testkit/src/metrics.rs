//! Reading a Prometheus/OpenMetrics text exposition, as the real binaries serve it on
//! `/metrics`: the one parser of the project, for tests and tools.

/// One sample: its name (with suffix), labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// The samples of an exposition; `# HELP`, `# TYPE` and `# EOF` lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)),
                None => (head, Vec::new()),
            };
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// The value of the sample `name` with exactly `labels`, if present.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text).into_iter().find_map(|s| {
        let same = s.name == name
            && s.labels.len() == labels.len()
            && s.labels
                .iter()
                .zip(labels)
                .all(|((k, v), (wk, wv))| k == wk && v == wv);
        same.then_some(s.value)
    })
}

/// The sum of every sample named `name`, whatever its labels.
pub fn sum(text: &str, name: &str) -> f64 {
    parse(text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

fn labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key, value));
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_escaped_labels() {
        let text = "# TYPE a counter\na_total{kind=\"x\",path=\"q\\\"uote\"} 3\ng 1.5\n# EOF\n";
        assert_eq!(
            parse(text)[0],
            Sample {
                name: "a_total".into(),
                labels: vec![
                    ("kind".into(), "x".into()),
                    ("path".into(), "q\"uote".into())
                ],
                value: 3.0
            }
        );
        assert_eq!(value(text, "g", &[]), Some(1.5));
        assert_eq!(
            value(text, "a_total", &[("kind", "x")]),
            None,
            "labels must match exactly"
        );
        assert_eq!(sum(text, "a_total"), 3.0);
    }
}
