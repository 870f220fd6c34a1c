//! The serde pass: YAML text → typed value, collecting every error instead of the first.
//!
//! serde stops at the first error, so we deserialize from a `Value` tree, record the error with
//! its path, prune the offending node (the field then takes its default) and try again. The
//! serde structs stay the only list of key names. Every field has a default, so serde never
//! reports "missing field"; required fields are checked by `validate`, which skips nodes pruned
//! here so one mistake is not reported twice.

use std::collections::{HashMap, HashSet};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml_ng::{Mapping, Value};

use super::error::ConfigError;

/// Bounds the prune-and-retry loop; each round removes a node, so a real file ends far sooner.
const MAX_ROUNDS: usize = 200;

/// What the serde pass produced: the value (defaults where nodes were pruned), the errors, and
/// the rendered paths of the pruned nodes.
pub(super) struct Parsed<T> {
    pub value: T,
    pub errors: Vec<ConfigError>,
    pub pruned: HashSet<String>,
    /// Position of every path in the file as written, to list errors in file order.
    pub order: HashMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path the way an operator reads the file: `accounts[1].headers.x-team`.
fn render(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Parses `text` into `T`. A YAML syntax error is returned alone (there is no tree to go on);
/// otherwise every type error and unknown key is in `errors`.
pub(super) fn parse<T: DeserializeOwned + Default>(text: &str) -> Result<Parsed<T>, ConfigError> {
    let mut root: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigError::new("", format!("invalid YAML: {e}")))?;
    if root.is_null() {
        // An empty file (or one with only comments) means all defaults.
        root = Value::Mapping(Mapping::new());
    }
    let mut order = HashMap::new();
    document_order(&root, &mut Vec::new(), &mut order);
    let mut errors = Vec::new();
    let mut pruned = HashSet::new();
    strip_non_string_keys(&mut root, &mut Vec::new(), &mut errors, &mut pruned);

    let mut attempts: HashMap<String, usize> = HashMap::new();
    for _ in 0..MAX_ROUNDS {
        let err = match serde_path_to_error::deserialize::<_, T>(&root) {
            Ok(value) => {
                return Ok(Parsed {
                    value,
                    errors,
                    pruned,
                    order,
                })
            }
            Err(err) => err,
        };
        let message = describe(err.inner());
        let Some(segs) = convert(err.path()) else {
            errors.push(ConfigError::new(err.path().to_string(), message));
            return Ok(gave_up(errors, pruned, order));
        };
        let path = render(&segs);
        let attempt = attempts.entry(path.clone()).or_insert(0);
        if *attempt == 0 {
            errors.push(ConfigError::new(path.clone(), message));
            pruned.insert(path);
        }
        if !prune(&mut root, &segs, *attempt) {
            return Ok(gave_up(errors, pruned, order));
        }
        *attempt += 1;
    }
    errors.push(ConfigError::new(
        "",
        format!("too many errors; stopped after {MAX_ROUNDS}"),
    ));
    Ok(gave_up(errors, pruned, order))
}

/// The result when the tree cannot be repaired further: the errors so far are what matters.
fn gave_up<T: Default>(
    errors: Vec<ConfigError>,
    pruned: HashSet<String>,
    order: HashMap<String, usize>,
) -> Parsed<T> {
    Parsed {
        value: T::default(),
        errors,
        pruned,
        order,
    }
}

/// Numbers every path of the tree in pre-order (a parent before its children).
fn document_order(node: &Value, path: &mut Vec<Seg>, order: &mut HashMap<String, usize>) {
    let next = order.len();
    order.entry(render(path)).or_insert(next);
    match node {
        Value::Mapping(map) => {
            for (key, value) in map {
                let shown = match key {
                    Value::String(k) => k.clone(),
                    other => serde_yaml_ng::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                path.push(Seg::Key(shown));
                document_order(value, path, order);
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                document_order(item, path, order);
                path.pop();
            }
        }
        Value::Tagged(tagged) => document_order(&tagged.value, path, order),
        _ => {}
    }
}

/// Sorts errors into file order: by the position of their path, or of its nearest ancestor
/// present in the file (a missing field sorts with its entry). Stable, so errors at one path
/// keep the order they were found in.
pub(super) fn sort_by_file_order(errors: &mut [ConfigError], order: &HashMap<String, usize>) {
    errors.sort_by_key(|e| {
        let mut path = e.path.as_str();
        loop {
            if let Some(at) = order.get(path) {
                return *at;
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => return 0,
            }
        }
    });
}

/// Turns serde's wording into the config's: an unknown field is an "unknown key".
fn describe(err: &serde_yaml_ng::Error) -> String {
    let text = err.to_string();
    if text.starts_with("unknown field `") {
        return match text.find(", expected") {
            Some(at) => format!("unknown key{}", &text[at..]),
            None => "unknown key".to_owned(),
        };
    }
    text
}

fn convert(path: &serde_path_to_error::Path) -> Option<Vec<Seg>> {
    path.iter()
        .map(|seg| match seg {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            _ => None,
        })
        .collect()
}

/// No config key is anything but a string; numbers or booleans as keys (`1: x`) are reported
/// and removed up front because serde cannot name them in a path.
fn strip_non_string_keys(
    node: &mut Value,
    path: &mut Vec<Seg>,
    errors: &mut Vec<ConfigError>,
    pruned: &mut HashSet<String>,
) {
    match node {
        Value::Mapping(map) => {
            let bad: Vec<Value> = map.keys().filter(|k| !k.is_string()).cloned().collect();
            for key in bad {
                let shown = serde_yaml_ng::to_string(&key).unwrap_or_default();
                path.push(Seg::Key(shown.trim().to_owned()));
                let at = render(path);
                errors.push(ConfigError::new(at.clone(), "key must be a string"));
                pruned.insert(at);
                path.pop();
                map.shift_remove(&key);
            }
            for (key, value) in map.iter_mut() {
                if let Value::String(k) = key {
                    path.push(Seg::Key(k.clone()));
                    strip_non_string_keys(value, path, errors, pruned);
                    path.pop();
                }
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                strip_non_string_keys(item, path, errors, pruned);
                path.pop();
            }
        }
        Value::Tagged(tagged) => strip_non_string_keys(&mut tagged.value, path, errors, pruned),
        _ => {}
    }
}

fn navigate<'a>(mut node: &'a mut Value, segs: &[Seg]) -> Option<&'a mut Value> {
    for seg in segs {
        while let Value::Tagged(tagged) = node {
            node = &mut tagged.value;
        }
        node = match (seg, node) {
            (Seg::Key(k), Value::Mapping(map)) => map.get_mut(k.as_str())?,
            (Seg::Index(i), Value::Sequence(items)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// Removes the node at `segs` so the next round gets past it. A mapping entry is deleted (the
/// field takes its default). A list element is replaced in place, so later elements keep their
/// index in error paths: first by `{}` (an all-default entry), then by `""`, and only then
/// removed. Returns false when nothing could be changed, which ends the loop.
fn prune(root: &mut Value, segs: &[Seg], attempt: usize) -> bool {
    let Some((last, parent)) = segs.split_last() else {
        if attempt > 0 {
            return false;
        }
        *root = Value::Mapping(Mapping::new());
        return true;
    };
    let Some(mut parent) = navigate(root, parent) else {
        return false;
    };
    while let Value::Tagged(tagged) = parent {
        parent = &mut tagged.value;
    }
    match (last, parent) {
        (Seg::Key(k), Value::Mapping(map)) => map.shift_remove(k.as_str()).is_some(),
        (Seg::Index(i), Value::Sequence(items)) if *i < items.len() => {
            match attempt {
                0 => items[*i] = Value::Mapping(Mapping::new()),
                1 => items[*i] = Value::String(String::new()),
                _ => {
                    items.remove(*i);
                }
            }
            true
        }
        _ => false,
    }
}
