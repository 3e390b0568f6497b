//! The built-in metric registry: one [`MetricDef`] per built-in, listed once in
//! `BUILTINS` (ripgrep's `flags/defs.rs` is the model), and option checking written once.
//!
//! Owns: each built-in's name, description, typed options with their defaults, planned
//! tables and constructor; [`check_options`], which turns a `[[metric]]` table's options into
//! typed [`Opts`] (unknown keys and wrong types rejected, defaults filled in); and the
//! option type a plugin declares ([`OptType::from_about`]), so a plugin's declared options
//! get the same checks. Must not: know the spec's text (errors carry the option's key; the
//! runner puts them on the key's `file:line:col`), load models, or run anything.
//!
//! Adding a built-in is one entry in `BUILTINS` and one `build` function: `runner list`,
//! the runner's option errors, views and the docs' option tables all read this list.

use std::collections::BTreeMap;

use super::{Metric, WeightMetric};
use crate::error::Error;
use crate::model::ModelConfig;

/// An option's type. `runner list` prints it, [`check_options`] enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptType {
    Bool,
    Int,
    /// A number: a TOML float or integer.
    Float,
    Str,
    /// The name of one of the spec's `[[dataset]]`s.
    Dataset,
    /// A list of strings (e.g. heads as `"L.H"`).
    List,
}

impl OptType {
    /// The word `runner list` and plugin descriptions use for this type.
    pub fn word(self) -> &'static str {
        match self {
            OptType::Bool => "bool",
            OptType::Int => "integer",
            OptType::Float => "number",
            OptType::Str => "string",
            OptType::Dataset => "dataset name",
            OptType::List => "list of strings",
        }
    }

    /// The type a plugin declares by the first word of its option's description
    /// (`"bool, default false: ..."`, the convention `hookgraph-plugin` documents): `bool`,
    /// `int`/`integer`, `float`/`number`, `string`, `dataset`, `list`. Other descriptions
    /// declare no type and are only checked for being declared.
    pub fn from_about(about: &str) -> Option<OptType> {
        let word: String = about
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect::<String>()
            .to_ascii_lowercase();
        Some(match word.as_str() {
            "bool" | "boolean" => OptType::Bool,
            "int" | "integer" => OptType::Int,
            "float" | "number" => OptType::Float,
            "string" | "str" => OptType::Str,
            "dataset" => OptType::Dataset,
            "list" => OptType::List,
            _ => return None,
        })
    }

    /// `v` as this type, or why not.
    fn accept(self, v: &toml::Value) -> std::result::Result<OptValue, String> {
        use toml::Value as V;
        Ok(match (self, v) {
            (OptType::Bool, V::Boolean(b)) => OptValue::Bool(*b),
            (OptType::Int, V::Integer(i)) => OptValue::Int(*i),
            (OptType::Float, V::Float(f)) => OptValue::Float(*f),
            (OptType::Float, V::Integer(i)) => OptValue::Float(*i as f64),
            (OptType::Str | OptType::Dataset, V::String(s)) => OptValue::Str(s.clone()),
            (OptType::List, V::Array(a)) => OptValue::List(
                a.iter()
                    .map(|x| match x {
                        V::String(s) => Ok(s.clone()),
                        other => Err(format!("a list of strings, but one item is {other}")),
                    })
                    .collect::<std::result::Result<_, _>>()?,
            ),
            (t, other) => {
                return Err(format!(
                    "must be {} {}, not {other}",
                    if t == OptType::Int { "an" } else { "a" },
                    t.word()
                ))
            }
        })
    }
}

/// One declared option: its name, type, default (a TOML literal; `None`: no default, the
/// metric decides) and what it does.
#[derive(Clone, Copy, Debug)]
pub struct OptionDef {
    pub name: &'static str,
    pub ty: OptType,
    pub default: Option<&'static str>,
    pub about: &'static str,
}

impl OptionDef {
    /// `type, default X: about` (what `runner list` prints).
    pub fn describe(&self) -> String {
        match self.default {
            Some(d) => format!("{}, default {d}: {}", self.ty.word(), self.about),
            None => format!("{}: {}", self.ty.word(), self.about),
        }
    }
}

/// A checked option value.
#[derive(Clone, Debug, PartialEq)]
pub enum OptValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<String>),
}

/// An option error: the key it belongs to (for the spec's `file:line:col`; `None` for the
/// `[[metric]]` table as a whole) and what is wrong.
#[derive(Clone, Debug)]
pub struct OptionError {
    pub key: Option<String>,
    pub msg: String,
}

impl OptionError {
    pub fn at(key: &str, msg: impl Into<String>) -> Self {
        OptionError {
            key: Some(key.to_string()),
            msg: msg.into(),
        }
    }
    /// As a crate error for `metric` (where no spec location is wanted).
    pub fn into_error(self, metric: &str) -> Error {
        Error::Metric {
            metric: metric.to_string(),
            msg: self.msg,
        }
    }
}

/// Options after [`check_options`]: every given option in its type, every default filled.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    values: BTreeMap<String, OptValue>,
}

impl Opts {
    pub fn get(&self, key: &str) -> Option<&OptValue> {
        self.values.get(key)
    }
    /// A bool option (declared with a default, so present).
    pub fn bool(&self, key: &str) -> bool {
        matches!(self.values.get(key), Some(OptValue::Bool(true)))
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.values.get(key) {
            Some(OptValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.values.get(key) {
            Some(OptValue::Float(f)) => Some(*f),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(OptValue::Str(s)) => Some(s),
            _ => None,
        }
    }
    pub fn list(&self, key: &str) -> Option<&[String]> {
        match self.values.get(key) {
            Some(OptValue::List(l)) => Some(l),
            _ => None,
        }
    }
}

/// Checks a `[[metric]]` table's options against what `metric` declares: unknown keys and
/// values of the wrong type are errors on their key; a `dataset name` must name one of
/// `datasets` (when given); absent options get their defaults. Built-ins and plugins share
/// it (a plugin declares `(name, ty)` pairs, `ty` from [`OptType::from_about`]).
pub fn check_options<'d>(
    metric: &str,
    declared: impl IntoIterator<Item = (&'d str, Option<OptType>, Option<&'d str>)>,
    options: &toml::Table,
    datasets: Option<&[&str]>,
) -> std::result::Result<Opts, OptionError> {
    let declared: Vec<_> = declared.into_iter().collect();
    let mut out = Opts::default();
    for (key, value) in options {
        let Some(&(_, ty, _)) = declared.iter().find(|(n, _, _)| n == key) else {
            let known: Vec<&str> = declared.iter().map(|(n, _, _)| *n).collect();
            return Err(OptionError::at(
                key,
                format!(
                    "metric '{metric}': unknown option '{key}' (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let Some(ty) = ty else { continue };
        let v = ty.accept(value).map_err(|why| {
            OptionError::at(key, format!("metric '{metric}': option '{key}' {why}"))
        })?;
        if let (OptType::Dataset, OptValue::Str(name), Some(known)) = (ty, &v, datasets) {
            if !known.contains(&name.as_str()) {
                return Err(OptionError::at(
                    key,
                    format!(
                        "metric '{metric}': option '{key}' names no [[dataset]] of this spec: '{name}' (datasets: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
        }
        out.values.insert(key.clone(), v);
    }
    for (name, ty, default) in declared {
        if out.values.contains_key(name) {
            continue;
        }
        if let (Some(ty), Some(d)) = (ty, default) {
            let v: toml::Value = toml::from_str::<toml::Table>(&format!("v = {d}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .expect("a built-in's default is a TOML literal");
            let v = ty
                .accept(&v)
                .expect("a built-in's default has the option's type");
            out.values.insert(name.to_string(), v);
        }
    }
    Ok(out)
}

/// What a built-in's constructor may read besides its options: the model's shape (for head
/// ranges) and the spec's datasets with their sizes. Tests and the bench pass
/// [`BuildCtx::default`] (nothing known, nothing checked against it).
#[derive(Default, Clone, Copy)]
pub struct BuildCtx<'a> {
    pub cfg: Option<&'a ModelConfig>,
    /// Every `[[dataset]]`'s name and shape.
    pub datasets: Option<&'a [DatasetShape<'a>]>,
    /// The spec's directory (files an option names are relative to it).
    pub spec_dir: Option<&'a std::path::Path>,
}

/// A dataset as a constructor sees it: name, number of sequences, tokens per sequence.
#[derive(Clone, Copy, Debug)]
pub struct DatasetShape<'a> {
    pub name: &'a str,
    pub n_sequences: usize,
    pub seq_len: usize,
}

impl BuildCtx<'_> {
    /// The shape of dataset `name`, if datasets are known.
    pub fn dataset(&self, name: &str) -> Option<DatasetShape<'_>> {
        self.datasets?.iter().find(|d| d.name == name).copied()
    }
}

/// A constructed built-in.
pub enum Built {
    Metric(Box<dyn Metric>),
    Weights(Box<dyn WeightMetric>),
}

/// A built-in's constructor: typed options in, a metric (or an error on one option) out.
pub type BuildFn = fn(&BuildCtx, &Opts) -> std::result::Result<Built, OptionError>;

/// One built-in metric.
pub struct MetricDef {
    pub name: &'static str,
    pub about: &'static str,
    pub options: &'static [OptionDef],
    /// The tables it writes (its name is the prefix a `name = ...` replaces).
    pub tables: &'static [&'static str],
    /// Computed from the weights alone ([`WeightMetric`]): needs no dataset.
    pub weights_only: bool,
    pub build: BuildFn,
}

impl MetricDef {
    /// Checks `options` and builds the metric.
    pub fn build(
        &self,
        ctx: &BuildCtx,
        options: &toml::Table,
    ) -> std::result::Result<Built, OptionError> {
        let names: Option<Vec<&str>> = ctx.datasets.map(|d| d.iter().map(|x| x.name).collect());
        let opts = check_options(
            self.name,
            self.options.iter().map(|o| (o.name, Some(o.ty), o.default)),
            options,
            names.as_deref(),
        )?;
        (self.build)(ctx, &opts)
    }
}

/// The built-in named `kind`.
pub fn find(kind: &str) -> Option<&'static MetricDef> {
    super::BUILTINS.iter().find(|b| b.name == kind)
}

/// The error for a `kind` that names no built-in.
pub fn unknown(kind: &str) -> Error {
    Error::Metric {
        metric: kind.to_string(),
        msg: format!(
            "unknown metric (built-ins: {}; or use `plugin = ...`)",
            super::BUILTINS
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Parses `"L.H"` heads (a `heads` option) against the model's shape when known; sorted,
/// deduplicated.
pub fn parse_heads(
    key: &str,
    heads: &[String],
    cfg: Option<&ModelConfig>,
) -> std::result::Result<Vec<(usize, usize)>, OptionError> {
    let mut out = Vec::new();
    for h in heads {
        let parsed = h.split_once('.').and_then(|(l, h)| {
            Some((
                l.trim().parse::<usize>().ok()?,
                h.trim().parse::<usize>().ok()?,
            ))
        });
        let Some((l, hh)) = parsed else {
            return Err(OptionError::at(
                key,
                format!("option '{key}': '{h}' is not a head; write \"layer.head\", e.g. \"10.7\""),
            ));
        };
        if let Some(cfg) = cfg {
            if l >= cfg.n_layers || hh >= cfg.n_heads {
                return Err(OptionError::at(
                    key,
                    format!(
                        "option '{key}': head {l}.{hh} is out of range: the model has {} layers of {} heads (layers 0..{}, heads 0..{})",
                        cfg.n_layers,
                        cfg.n_heads,
                        cfg.n_layers - 1,
                        cfg.n_heads - 1
                    ),
                ));
            }
        }
        out.push((l, hh));
    }
    if out.is_empty() {
        return Err(OptionError::at(
            key,
            format!("option '{key}' lists no head"),
        ));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn types_defaults_and_unknown_keys() {
        let decl = [
            ("flag", Some(OptType::Bool), Some("false")),
            ("k", Some(OptType::Float), Some("0.05")),
            ("n", Some(OptType::Int), None),
            ("heads", Some(OptType::List), Some("[\"10.7\"]")),
            ("over", Some(OptType::Dataset), None),
        ];
        let o = check_options("m", decl, &table("n = 3\nk = 1"), None).unwrap();
        assert_eq!(o.int("n"), Some(3));
        assert_eq!(o.float("k"), Some(1.0));
        assert!(!o.bool("flag"));
        assert_eq!(o.list("heads").unwrap(), ["10.7".to_string()]);
        assert_eq!(o.str("over"), None);
        let e = check_options("m", decl, &table("flag = 1"), None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("flag"));
        assert!(e.msg.contains("must be a bool"), "{}", e.msg);
        let e = check_options("m", decl, &table("nope = 1"), None).unwrap_err();
        assert!(e.msg.contains("unknown option 'nope'"), "{}", e.msg);
        let e = check_options("m", decl, &table("heads = [1]"), None).unwrap_err();
        assert!(e.msg.contains("list of strings"), "{}", e.msg);
        let e = check_options("m", decl, &table("over = 'x'"), Some(&["a", "b"])).unwrap_err();
        assert!(e.msg.contains("names no [[dataset]]"), "{}", e.msg);
        assert!(check_options("m", decl, &table("over = 'b'"), Some(&["a", "b"])).is_ok());
    }

    #[test]
    fn every_builtin_default_parses_in_its_type() {
        for b in super::super::BUILTINS {
            check_options(
                b.name,
                b.options.iter().map(|o| (o.name, Some(o.ty), o.default)),
                &toml::Table::new(),
                None,
            )
            .unwrap();
        }
    }

    #[test]
    fn plugin_types_from_descriptions() {
        assert_eq!(
            OptType::from_about("bool, default false: x"),
            Some(OptType::Bool)
        );
        assert_eq!(OptType::from_about("integer >= 1"), Some(OptType::Int));
        assert_eq!(OptType::from_about("what it does"), None);
    }

    #[test]
    fn heads_in_range() {
        let cfg = ModelConfig {
            n_layers: 2,
            n_heads: 4,
            d_model: 8,
            d_head: 2,
            d_mlp: 32,
            d_vocab: 10,
            n_ctx: 16,
            eps: 1e-5,
            bos_token_id: 0,
        };
        let ok = parse_heads("heads", &["1.3".into(), "0.0".into()], Some(&cfg)).unwrap();
        assert_eq!(ok, vec![(0, 0), (1, 3)]);
        let e = parse_heads("heads", &["2.0".into()], Some(&cfg)).unwrap_err();
        assert!(e.msg.contains("out of range"), "{}", e.msg);
        assert!(parse_heads("heads", &["x".into()], None).is_err());
    }
}
