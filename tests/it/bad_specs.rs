//! Bad `[[intervention]]` and direct-path metric input through the `runner` CLI (issues #19 and
//! #20): each is a `spec.toml:LINE:COL` error naming the problem, raised before any forward
//! pass, and nothing is written (no output directory, no partial tables).

use crate::common::*;

/// `spec.toml:LINE:COL` of the value of the line `needle` (1-based; the column is where the
/// value after `key = ` starts, as the spec errors point at values).
/// With `key`, the column of the key instead (metric option errors point at the key).
fn at_col(spec: &str, needle: &str, key: bool) -> String {
    let (i, line) = spec
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim() == needle)
        .unwrap_or_else(|| panic!("no line {needle:?} in the spec"));
    let col = if key {
        line.find(|c: char| !c.is_whitespace()).unwrap_or(0) + 1
    } else {
        line.find(" = ").map_or(1, |c| c + 4)
    };
    format!("spec.toml:{}:{}", i + 1, col)
}

/// Runs the spec (extra files written first into its dir) and checks the error and that
/// nothing was written.
fn fails(spec: &str, files: &[(&str, &str)], needle: &str, words: &str) {
    fails_at(spec, files, needle, false, words)
}

/// [`fails`], pointing at the key's column when `key`.
fn fails_at(spec: &str, files: &[(&str, &str)], needle: &str, key: bool, words: &str) {
    let case = SpecCase::new(spec);
    for (name, text) in files {
        std::fs::write(case.path(name), text).unwrap();
    }
    let before = case.entries();
    let (code, _, stderr) = case.run(&[]);
    assert_ne!(code, Some(0), "{spec}\nran without error");
    let want = at_col(spec, needle, key);
    assert!(
        stderr.contains(&want) && stderr.contains(words),
        "{spec}\n-> {stderr}\n(want {want} ... {words})"
    );
    assert_eq!(case.entries(), before, "{spec}\nsomething was written");
    assert!(!case.out.exists(), "{spec}\nthe output directory was made");
}

/// ckpt_a (2 layers x 4 heads, vocabulary 512) on the 3 x 12 tokens of tokens_a.json (with
/// answers from `@DIR@/answers.json`), then `rest`.
fn intervention_spec(answers: bool, rest: &str) -> String {
    let answers = if answers {
        "answers = \"@DIR@/answers.json\"\n"
    } else {
        ""
    };
    format!(
        "name = \"bad\"\noutput = \"@OUT@\"\nheads = \"all\"\n[model]\npath = \"@FIXTURES@/ckpt_a\"\n\
         [[dataset]]\nname = \"clean\"\nkind = \"tokens\"\npath = \"@GOLDEN@/tokens_a.json\"\n{answers}\
         [[dataset]]\nname = \"long\"\nkind = \"tokens\"\npath = \"@GOLDEN@/cspa_tokens_a.json\"\n\
         [[intervention]]\n{rest}"
    )
}

const ANSWERS: &str = "[[1, 2], [3, 4], [5, 6]]";

#[test]
fn bad_interventions_are_located_cli_errors() {
    let ok = [("answers.json", ANSWERS)];
    // A hook that does not exist.
    let s = intervention_spec(false, "kind = \"ablate\"\nvalue = \"zero\"\nhook = \"q\"\n");
    fails(&s, &ok, "hook = \"q\"", "not one of");
    // A head past the last layer, and past the last head of a layer.
    for h in ["2.0", "0.4"] {
        let s = intervention_spec(
            false,
            &format!("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nheads = [\"{h}\"]\n"),
        );
        fails(&s, &ok, &format!("heads = [\"{h}\"]"), "heads");
    }
    // A source of another shape (3 x 12 against 6 x 24).
    let s = intervention_spec(
        false,
        "kind = \"patch\"\nhook = \"z\"\ndataset = \"clean\"\nsource = \"long\"\n",
    );
    fails(&s, &ok, "source = \"long\"", "shapes must match");
    // mean_over naming no dataset.
    let s = intervention_spec(
        false,
        "kind = \"ablate\"\nvalue = \"mean\"\nhook = \"z\"\nmean_over = \"nope\"\n",
    );
    fails(&s, &ok, "mean_over = \"nope\"", "nope");
    // per_position on sequences of unequal lengths (tokens_a.json is padded).
    let s = intervention_spec(
        false,
        "kind = \"ablate\"\nvalue = \"zero\"\nhook = \"resid_pre\"\ndataset = \"clean\"\nper_position = true\n",
    );
    fails(&s, &ok, "per_position = true", "one length");
}

#[test]
fn bad_answers_are_located_cli_errors() {
    let rest = "kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\ndataset = \"clean\"\n";
    let s = intervention_spec(true, rest);
    // Fewer answer pairs than sequences.
    fails(
        &s,
        &[("answers.json", "[[1, 2], [3, 4]]")],
        "answers = \"@DIR@/answers.json\"",
        "answers",
    );
    // An id outside the 512-token vocabulary.
    fails(
        &s,
        &[("answers.json", "[[1, 2], [3, 4], [5, 512]]")],
        "answers = \"@DIR@/answers.json\"",
        "vocabulary",
    );
}

/// ckpt_a with an eval set and a mean set (`n` sequences of cspa_mean_tokens_a.json), then a
/// `[[metric]]` with `rest`.
fn cspa_spec(n_mean: usize, rest: &str) -> String {
    format!(
        "name = \"bad\"\noutput = \"@OUT@\"\nheads = \"all\"\n[model]\npath = \"@FIXTURES@/ckpt_a\"\n\
         [[dataset]]\nname = \"eval\"\nkind = \"tokens\"\npath = \"@GOLDEN@/cspa_tokens_a.json\"\n\
         [[dataset]]\nname = \"mean\"\nkind = \"tokens\"\npath = \"@GOLDEN@/cspa_mean_tokens_a.json\"\nn = {n_mean}\n\
         [[metric]]\n{rest}"
    )
}

/// cspa's own `heads` (its default, 10.7, is not in ckpt_a); direct_mean_ablation has none.
fn cspa_heads(kind: &str) -> &'static str {
    if kind == "cspa" {
        "heads = [\"1.0\"]\n"
    } else {
        ""
    }
}

#[test]
fn bad_cspa_options_are_located_cli_errors() {
    // A head out of range.
    for h in ["2.0", "1.4"] {
        let s = cspa_spec(
            100,
            &format!("kind = \"cspa\"\nheads = [\"{h}\"]\nmean_over = \"mean\"\n"),
        );
        fails_at(&s, &[], &format!("heads = [\"{h}\"]"), true, "heads");
    }
    // mean_over naming no dataset.
    for kind in ["cspa", "direct_mean_ablation"] {
        let s = cspa_spec(
            100,
            &format!(
                "kind = \"{kind}\"\n{}mean_over = \"webtext\"\n",
                cspa_heads(kind)
            ),
        );
        fails_at(&s, &[], "mean_over = \"webtext\"", true, "webtext");
    }
    // A mean dataset of fewer than 100 sequences: an error that says so and names the opt-in.
    for kind in ["cspa", "direct_mean_ablation"] {
        let s = cspa_spec(
            40,
            &format!(
                "kind = \"{kind}\"\n{}mean_over = \"mean\"\n",
                cspa_heads(kind)
            ),
        );
        fails_at(&s, &[], "mean_over = \"mean\"", true, "fewer than the 100");
        fails_at(&s, &[], "mean_over = \"mean\"", true, "allow_short_mean");
    }
    // k_fraction outside (0, 1].
    for k in ["0.0", "-0.1", "1.5"] {
        let s = cspa_spec(
            100,
            &format!(
                "kind = \"cspa\"\nheads = [\"1.0\"]\nmean_over = \"mean\"\nk_fraction = {k}\n"
            ),
        );
        fails_at(&s, &[], &format!("k_fraction = {k}"), true, "(0, 1]");
    }
}

/// The opt-in: with `allow_short_mean = true` the 40 sequences there are are averaged and
/// `validate` passes.
#[test]
fn short_mean_runs_when_asked() {
    let s = cspa_spec(
        40,
        "kind = \"cspa\"\nheads = [\"1.0\"]\nmean_over = \"mean\"\nallow_short_mean = true\n",
    );
    let case = SpecCase::new(&s);
    let (code, stderr) = case.validate();
    assert_eq!(code, Some(0), "{stderr}");
}
