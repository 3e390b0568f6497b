//! IOI prompts (indirect object identification), generated in-process.
//!
//! Owns: the built-in lists (first names, places, objects and the BABA templates of Wang et
//! al.'s IOI dataset), template parsing and the ABBA variants, seeded sampling of prompts,
//! and the positions of each prompt's names in its BOS-prepended tokens ([`IoiPrompt`]).
//! Must not: read files, run the model, or know what a metric does with the positions.
//!
//! A run reproduces TransformerLens/ARENA's
//! `generate_data_and_caches(n, seed, only_ioi=True, prepend_bos=True, symmetric=True)` in
//! kind, not bit for bit: Python's `random` cannot be matched from Rust, so prompts are drawn
//! from a ChaCha8 stream seeded with `seed` (stable across platforms and releases of this
//! crate, which is what makes results reproducible).

use rand::seq::index::sample;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{err, DataContext, Dataset};
use crate::error::Result;
use crate::spec::{Corruption, DatasetSpec};
use crate::tokenizer::{batch_tokens, GptTokenizer};

/// One IOI prompt: its positions and answer.
///
/// Positions index the BOS-prepended token sequence (the BOS is position 0).
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoiPrompt {
    /// The prompt without BOS and without the answer, e.g. "Then, Mary and John went to the
    /// store. John gave a drink to".
    pub text: String,
    /// The indirect object (the answer), without its leading space.
    pub io_name: String,
    /// The subject (the name mentioned twice), without its leading space.
    pub s_name: String,
    pub io_pos: usize,
    /// The subject's first mention.
    pub s1_pos: usize,
    /// The subject's second mention.
    pub s2_pos: usize,
    /// The last token (" to" for the built-in templates), where the answer is predicted.
    pub end_pos: usize,
    /// The answer token (the IO name with a leading space).
    pub answer: u32,
    /// The subject's token (the S name with a leading space): the wrong answer a logit
    /// difference is taken against.
    pub s_token: u32,
    /// The name written at `s2_pos`: `s_name`, except in a corrupted counterpart
    /// ([`Corruption`]), whose records keep the original's roles (`io_name`, `s_name`,
    /// `answer`, `s_token`: what its answers are scored by) and name here what changed.
    pub s2_name: String,
    /// Index into the expanded template list ([`expand_templates`]): the `k` BABA templates
    /// first (`0..k`), then their ABBA versions in the same order (`k..2k`).
    pub template: usize,
}

/// Default number of prompts.
pub const DEFAULT_N: usize = 20;
/// Default seed.
pub const DEFAULT_SEED: u64 = 0;

/// First names from the IOI dataset of Wang et al. (2022), plus " Arthur"; each is one GPT-2
/// token after a space (a test checks every one with the real tokenizer).
pub const NAMES: &[&str] = &[
    "Michael",
    "Christopher",
    "Jessica",
    "Matthew",
    "Ashley",
    "Jennifer",
    "Joshua",
    "Amanda",
    "Daniel",
    "David",
    "James",
    "Robert",
    "John",
    "Joseph",
    "Andrew",
    "Ryan",
    "Brandon",
    "Jason",
    "Justin",
    "Sarah",
    "William",
    "Jonathan",
    "Stephanie",
    "Brian",
    "Nicole",
    "Nicholas",
    "Anthony",
    "Heather",
    "Eric",
    "Elizabeth",
    "Adam",
    "Megan",
    "Melissa",
    "Kevin",
    "Steven",
    "Thomas",
    "Timothy",
    "Christina",
    "Kyle",
    "Rachel",
    "Laura",
    "Lauren",
    "Amber",
    "Brittany",
    "Danielle",
    "Richard",
    "Kimberly",
    "Jeffrey",
    "Amy",
    "Crystal",
    "Michelle",
    "Tiffany",
    "Jeremy",
    "Benjamin",
    "Mark",
    "Emily",
    "Aaron",
    "Charles",
    "Rebecca",
    "Jacob",
    "Stephen",
    "Patrick",
    "Sean",
    "Erin",
    "Jamie",
    "Kelly",
    "Samantha",
    "Nathan",
    "Sara",
    "Dustin",
    "Paul",
    "Angela",
    "Tyler",
    "Scott",
    "Katherine",
    "Andrea",
    "Gregory",
    "Erica",
    "Mary",
    "Travis",
    "Lisa",
    "Kenneth",
    "Bryan",
    "Lindsey",
    "Kristen",
    "Jose",
    "Alexander",
    "Jesse",
    "Katie",
    "Lindsay",
    "Shannon",
    "Vanessa",
    "Courtney",
    "Christine",
    "Alicia",
    "Cody",
    "Allison",
    "Bradley",
    "Samuel",
    "Arthur",
];

/// Places from the IOI dataset.
pub const PLACES: &[&str] = &[
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
];

/// Objects from the IOI dataset.
pub const OBJECTS: &[&str] = &[
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
];

/// The IOI paper's BABA templates. The final ` [A]` is the answer: it is stripped, so a
/// prompt ends where the model must predict the IO. ABBA versions are derived
/// ([`Template::abba`]), so the dataset uses twice as many templates.
pub const BABA_TEMPLATES: &[&str] = &[
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
];

/// A placeholder of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The indirect object.
    A,
    /// The subject.
    B,
    Place,
    Object,
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Slot(Slot),
}

/// A parsed template: the prompt part only (no answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub pieces: Vec<Piece>,
    /// Whether the names come in ABBA order (IO first) rather than BABA.
    pub abba: bool,
}

impl Template {
    /// Parses a BABA template: `[B]`, `[A]`, `[B]` in that order (and nothing else naming a
    /// person), each name after a space and not glued to a following letter or digit (so
    /// that it stays one token), `[PLACE]` and `[OBJECT]` anywhere. A final ` [A]` (the
    /// answer, as the IOI paper writes its templates) is dropped. The error is a sentence.
    pub fn parse_baba(text: &str) -> std::result::Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('[') {
            let (before, from) = rest.split_at(open);
            let close = from.find(']');
            // Only `[UPPERCASE]` is a placeholder; any other bracket is literal text.
            let tag = close
                .map(|c| &from[1..c])
                .filter(|t| !t.is_empty() && t.chars().all(|ch| ch.is_ascii_uppercase()));
            let Some(tag) = tag else {
                push_text(&mut pieces, before);
                push_text(&mut pieces, "[");
                rest = &from[1..];
                continue;
            };
            push_text(&mut pieces, before);
            pieces.push(Piece::Slot(match tag {
                "A" => Slot::A,
                "B" => Slot::B,
                "PLACE" => Slot::Place,
                "OBJECT" => Slot::Object,
                other => {
                    return Err(format!(
                        "unknown placeholder '[{other}]' (use [A], [B], [PLACE], [OBJECT])"
                    ))
                }
            }));
            rest = &from[tag.len() + 2..];
        }
        push_text(&mut pieces, rest);

        // Drop the answer: a final " [A]".
        if let [.., Piece::Text(t), Piece::Slot(Slot::A)] = pieces.as_slice() {
            if t.ends_with(' ') {
                pieces.pop();
                if let Some(Piece::Text(t)) = pieces.last_mut() {
                    t.pop();
                    if t.is_empty() {
                        pieces.pop();
                    }
                }
            }
        }
        let names: Vec<Slot> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Slot(s @ (Slot::A | Slot::B)) => Some(*s),
                _ => None,
            })
            .collect();
        if names != [Slot::B, Slot::A, Slot::B] {
            return Err(
                "the names must come as [B] ... [A] ... [B] (BABA), optionally followed by a final ' [A]' (the answer)"
                    .into(),
            );
        }
        for (i, p) in pieces.iter().enumerate() {
            if !matches!(p, Piece::Slot(Slot::A | Slot::B)) {
                continue;
            }
            let after_space =
                matches!(pieces.get(i.wrapping_sub(1)), Some(Piece::Text(t)) if t.ends_with(' '));
            if i == 0 || !after_space {
                return Err("every [A] and [B] must follow a space (a name is one token with its leading space, like ' Mary')".into());
            }
            let glued = match pieces.get(i + 1) {
                Some(Piece::Text(t)) => t.starts_with(|c: char| c.is_alphanumeric()),
                Some(Piece::Slot(_)) => true,
                None => false,
            };
            if glued {
                return Err("a name placeholder must not be followed directly by a letter, a digit or another placeholder".into());
            }
        }
        match pieces.last() {
            Some(Piece::Text(t)) if t.ends_with(char::is_whitespace) => {
                return Err("the prompt must not end with whitespace".into())
            }
            _ => {}
        }
        Ok(Template {
            pieces,
            abba: false,
        })
    }

    /// The ABBA version of a BABA template: the first `[B]` and the first `[A]` swap, as in
    /// the IOI paper (`"Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"`).
    pub fn abba(&self) -> Template {
        let mut pieces = self.pieces.clone();
        let first = |s: Slot| pieces.iter().position(|p| *p == Piece::Slot(s));
        if let (Some(b), Some(a)) = (first(Slot::B), first(Slot::A)) {
            pieces.swap(a, b);
        }
        Template {
            pieces,
            abba: !self.abba,
        }
    }

    /// The template with its placeholders, as it would be written (without the answer).
    pub fn to_text(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Slot(Slot::A) => "[A]",
                Piece::Slot(Slot::B) => "[B]",
                Piece::Slot(Slot::Place) => "[PLACE]",
                Piece::Slot(Slot::Object) => "[OBJECT]",
            })
            .collect()
    }

    pub fn uses(&self, slot: Slot) -> bool {
        self.pieces.contains(&Piece::Slot(slot))
    }

    /// The prompt text and the byte offsets of the IO, S1 and S2 names in it.
    pub fn fill(&self, io: &str, s: &str, place: &str, object: &str) -> (String, [usize; 3]) {
        self.fill_s2(io, s, s, place, object)
    }

    /// [`fill`](Self::fill) with `s2` written at the subject's second mention (a corrupted
    /// counterpart's prompt).
    pub fn fill_s2(
        &self,
        io: &str,
        s: &str,
        s2: &str,
        place: &str,
        object: &str,
    ) -> (String, [usize; 3]) {
        let mut text = String::new();
        let (mut io_at, mut s_at) = (0, Vec::with_capacity(2));
        for p in &self.pieces {
            match p {
                Piece::Text(t) => text.push_str(t),
                Piece::Slot(Slot::A) => {
                    io_at = text.len();
                    text.push_str(io);
                }
                Piece::Slot(Slot::B) => {
                    s_at.push(text.len());
                    text.push_str(if s_at.len() == 1 { s } else { s2 });
                }
                Piece::Slot(Slot::Place) => text.push_str(place),
                Piece::Slot(Slot::Object) => text.push_str(object),
            }
        }
        // parse_baba guarantees exactly two [B]s.
        let s1 = s_at.first().copied().unwrap_or(0);
        let s2 = s_at.get(1).copied().unwrap_or(0);
        (text, [io_at, s1, s2])
    }
}

fn push_text(pieces: &mut Vec<Piece>, t: &str) {
    if t.is_empty() {
        return;
    }
    if let Some(Piece::Text(last)) = pieces.last_mut() {
        last.push_str(t);
    } else {
        pieces.push(Piece::Text(t.to_string()));
    }
}

/// BABA templates followed by their ABBA versions: the list [`IoiPrompt::template`] indexes.
pub fn expand_templates(baba: &[Template]) -> Vec<Template> {
    baba.iter()
        .cloned()
        .chain(baba.iter().map(Template::abba))
        .collect()
}

/// Everything an IOI dataset is drawn from, with the spec's overrides applied.
#[derive(Debug, Clone)]
pub struct IoiOptions {
    pub n: usize,
    pub seed: u64,
    pub symmetric: bool,
    pub names: Vec<String>,
    pub places: Vec<String>,
    pub objects: Vec<String>,
    /// BABA templates (ABBA versions are derived).
    pub templates: Vec<String>,
}

impl Default for IoiOptions {
    fn default() -> Self {
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        IoiOptions {
            n: DEFAULT_N,
            seed: DEFAULT_SEED,
            symmetric: true,
            names: own(NAMES),
            places: own(PLACES),
            objects: own(OBJECTS),
            templates: own(BABA_TEMPLATES),
        }
    }
}

impl IoiOptions {
    /// The built-in defaults with the spec's keys applied.
    pub fn from_spec(spec: &DatasetSpec) -> Self {
        let d = IoiOptions::default();
        IoiOptions {
            n: spec.n.unwrap_or(d.n),
            seed: spec.seed.unwrap_or(d.seed),
            symmetric: spec.symmetric.unwrap_or(d.symmetric),
            names: spec.names.as_ref().map_or(d.names, |n| n.get_ref().clone()),
            places: spec.places.clone().unwrap_or(d.places),
            objects: spec.objects.clone().unwrap_or(d.objects),
            templates: spec.templates.clone().unwrap_or(d.templates),
        }
    }
}

/// Builds an `ioi` dataset from its spec.
pub fn build(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let tok = ctx.tokenizer(&spec.name)?;
    generate(&spec.name, &IoiOptions::from_spec(spec), tok, ctx)
}

/// Checks a name list: each name one token after a space, at least two distinct. Returns the
/// distinct names (first occurrence order) with their token ids.
pub fn check_names(
    dataset: &str,
    names: &[String],
    tok: &GptTokenizer,
) -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = Vec::with_capacity(names.len());
    for name in names {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(err(
                dataset,
                format!(
                    "name {name:?} must be one word without spaces (the leading space is added)"
                ),
            ));
        }
        let ids = tok.encode(&format!(" {name}"))?;
        if ids.len() != 1 {
            return Err(err(
                dataset,
                format!(
                    "name '{name}' is not a single token for this tokenizer (' {name}' -> {} tokens)",
                    ids.len()
                ),
            ));
        }
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.clone(), ids[0]));
        }
    }
    if out.len() < 2 {
        return Err(err(dataset, "`names` needs at least two different names"));
    }
    Ok(out)
}

/// Generates the prompts and their tokens: BOS first, right-padded with BOS. Their answers
/// are (IO, S) at the last position.
pub fn generate(
    dataset: &str,
    opts: &IoiOptions,
    tok: &GptTokenizer,
    ctx: &DataContext,
) -> Result<Dataset> {
    generate_with(dataset, opts, None, tok, ctx)
}

/// The corrupted counterpart, named `dataset`, of the ioi dataset `opts` describes: the same
/// draws (template, names, place, object, in the same order from the same seed), with the
/// subject's second mention changed as `how` says, and the original's answers. Every name
/// is one token, so the counterpart has the original's shape and positions (the caller
/// checks the shape against the original it built).
pub fn generate_corrupted(
    dataset: &str,
    opts: &IoiOptions,
    how: Corruption,
    tok: &GptTokenizer,
    ctx: &DataContext,
) -> Result<Dataset> {
    generate_with(dataset, opts, Some(how), tok, ctx)
}

/// The ABC corruption's third names come from their own ChaCha8 stream of the same seed, so
/// the original's draws (stream 0) are untouched.
const ABC_STREAM: u64 = 1;

fn generate_with(
    dataset: &str,
    opts: &IoiOptions,
    corrupt: Option<Corruption>,
    tok: &GptTokenizer,
    ctx: &DataContext,
) -> Result<Dataset> {
    let e = |msg: String| err(dataset, msg);
    if opts.n == 0 {
        return Err(e("n must be at least 1".into()));
    }
    if opts.symmetric && opts.n % 2 != 0 {
        return Err(e(format!(
            "n = {} is odd; with symmetric = true (the default) prompts come in name-swapped pairs, so n must be even",
            opts.n
        )));
    }
    let names = check_names(dataset, &opts.names, tok)?;
    if corrupt == Some(Corruption::Abc) && names.len() < 3 {
        return Err(e(format!(
            "corrupt = \"abc\" needs a third name, and `names` has only {} different names",
            names.len()
        )));
    }
    if opts.templates.is_empty() {
        return Err(e("`templates` is empty".into()));
    }
    let baba = opts
        .templates
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Template::parse_baba(t).map_err(|m| e(format!("template {} ({t:?}): {m}", i + 1)))
        })
        .collect::<Result<Vec<_>>>()?;
    let templates = expand_templates(&baba);
    for (what, list, slot) in [
        ("places", &opts.places, Slot::Place),
        ("objects", &opts.objects, Slot::Object),
    ] {
        if let Some(bad) = list.iter().find(|s| s.trim().is_empty()) {
            return Err(e(format!("`{what}` has an empty entry {bad:?}")));
        }
        if list.is_empty() && templates.iter().any(|t| t.uses(slot)) {
            return Err(e(format!(
                "`{what}` is empty but a template uses [{}]",
                if slot == Slot::Place {
                    "PLACE"
                } else {
                    "OBJECT"
                }
            )));
        }
    }

    let bos = ctx.cfg.bos_token_id;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut abc_rng = ChaCha8Rng::seed_from_u64(opts.seed);
    abc_rng.set_stream(ABC_STREAM);
    let draws = if opts.symmetric { opts.n / 2 } else { opts.n };
    // A prompt costs its record, its text and names, its ids and its row of the token
    // matrix: about 512 bytes. Checked before allocating: `Vec::with_capacity` aborts the
    // process on a size that cannot fit.
    super::check_fits(dataset, "prompts", opts.n, 512)?;
    let oom = |_| e(format!("n = {}: not enough memory for the prompts", opts.n));
    let mut prompts = Vec::new();
    prompts.try_reserve_exact(opts.n).map_err(oom)?;
    let mut encoded = Vec::new();
    encoded.try_reserve_exact(opts.n).map_err(oom)?;
    for _ in 0..draws {
        // One draw: template, two distinct names, place, object (the order is part of what
        // makes a seed reproducible: do not reorder).
        let t = rng.gen_range(0..templates.len());
        let pair = sample(&mut rng, names.len(), 2);
        let (io, s) = (&names[pair.index(0)], &names[pair.index(1)]);
        let place = pick(&mut rng, &opts.places);
        let object = pick(&mut rng, &opts.objects);
        let mut roles = vec![(io, s)];
        if opts.symmetric {
            roles.push((s, io));
        }
        for (io, s) in roles {
            let s2 = match corrupt {
                None => s,
                Some(Corruption::Flip) => io,
                Some(Corruption::Abc) => {
                    // Uniform over the names that are neither IO nor S.
                    let k = abc_rng.gen_range(0..names.len() - 2);
                    names
                        .iter()
                        .filter(|n| n.0 != io.0 && n.0 != s.0)
                        .nth(k)
                        .unwrap_or(s)
                }
            };
            let (p, ids) = make_prompt(dataset, tok, &templates[t], t, [io, s, s2], place, object)?;
            if ids.len() + 1 > ctx.cfg.n_ctx {
                return Err(e(format!(
                    "prompt {:?} is {} tokens with BOS, longer than the model's context ({})",
                    p.text,
                    ids.len() + 1,
                    ctx.cfg.n_ctx
                )));
            }
            prompts.push(p);
            encoded.push(ids);
        }
    }
    let tokens = batch_tokens(&encoded, Some(bos), bos, usize::MAX);
    let lengths = encoded.iter().map(|ids| ids.len() + 1).collect();
    let answers = prompts.iter().map(|p| [p.answer, p.s_token]).collect();
    Ok(Dataset {
        name: dataset.to_string(),
        tokens,
        lengths,
        ioi: Some(prompts),
        answers: Some(answers),
    })
}

fn pick<'a>(rng: &mut ChaCha8Rng, list: &'a [String]) -> &'a str {
    if list.is_empty() {
        ""
    } else {
        &list[rng.gen_range(0..list.len())]
    }
}

/// One prompt: its text, positions (BOS-prepended) and token ids (without BOS); `[io, s,
/// s2]` are the names and ids of the IO, the subject and the name written at its second
/// mention (the subject, but for a corrupted counterpart).
fn make_prompt(
    dataset: &str,
    tok: &GptTokenizer,
    template: &Template,
    index: usize,
    [io, s, s2]: [&(String, u32); 3],
    place: &str,
    object: &str,
) -> Result<(IoiPrompt, Vec<u32>)> {
    let (text, [io_at, s1_at, s2_at]) = template.fill_s2(&io.0, &s.0, &s2.0, place, object);
    let ids = tok.encode(&text)?;
    // A name's position is the token count of the text before its leading space, plus the
    // BOS; check that the full encoding really has the name as that token, so a template or a
    // place that glues onto a name cannot silently shift the positions.
    let pos = |at: usize, id: u32| -> Result<usize> {
        let before = tok.encode(&text[..at - 1])?;
        let ok = ids.len() > before.len()
            && ids[..before.len()] == before[..]
            && ids[before.len()] == id;
        if !ok {
            return Err(err(
                dataset,
                format!(
                    "template {:?}: in {text:?} the name at byte {at} is not its own token; keep a space before each name and punctuation or a space after it",
                    template.to_text()
                ),
            ));
        }
        Ok(before.len() + 1)
    };
    let prompt = IoiPrompt {
        io_pos: pos(io_at, io.1)?,
        s1_pos: pos(s1_at, s.1)?,
        s2_pos: pos(s2_at, s2.1)?,
        end_pos: ids.len(),
        answer: io.1,
        s_token: s.1,
        s2_name: s2.0.clone(),
        template: index,
        io_name: io.0.clone(),
        s_name: s.0.clone(),
        text,
    };
    Ok((prompt, ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn gpt2() -> GptTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/checkpoints/tiny-gpt2");
        GptTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap()
    }

    #[test]
    fn parses_baba_and_drops_the_answer() {
        let t = Template::parse_baba(BABA_TEMPLATES[0]).unwrap();
        assert_eq!(
            t.to_text(),
            "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
        );
        assert!(!t.abba);
        // Without the answer it parses to the same thing.
        assert_eq!(Template::parse_baba(&t.to_text()).unwrap(), t);
        let a = t.abba();
        assert!(a.abba);
        assert_eq!(
            a.to_text(),
            "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"
        );
        let (text, [io, s1, s2]) = a.fill("Mary", "John", "store", "drink");
        assert_eq!(
            text,
            "Then, Mary and John went to the store. John gave a drink to"
        );
        assert_eq!((&text[io..io + 4], io), ("Mary", 6));
        assert_eq!((&text[s1..s1 + 4], &text[s2..s2 + 4]), ("John", "John"));
        assert!(s1 < s2 && io < s1);
        // Literal brackets are text.
        let t = Template::parse_baba("[note] Then, [B] and [A] left. [B] said to").unwrap();
        assert_eq!(t.to_text(), "[note] Then, [B] and [A] left. [B] said to");
    }

    #[test]
    fn every_builtin_template_parses() {
        let all: Vec<_> = BABA_TEMPLATES
            .iter()
            .map(|t| Template::parse_baba(t).unwrap())
            .collect();
        let expanded = expand_templates(&all);
        assert_eq!(expanded.len(), 2 * BABA_TEMPLATES.len());
        assert!(expanded[..all.len()].iter().all(|t| !t.abba));
        assert!(expanded[all.len()..].iter().all(|t| t.abba));
        for t in &expanded {
            assert!(t.to_text().ends_with(" to"), "{}", t.to_text());
        }
    }

    #[test]
    fn rejects_bad_templates() {
        let bad = [
            ("Then, [A] and [B] went. [B] gave it to", "BABA"),
            ("Then, [B] and [A] went. [A] gave it to", "BABA"),
            ("Then, [B] and [C] went. [B] gave it to [A]", "[C]"),
            ("Then,[B] and [A] went. [B] gave it to", "space"),
            ("[B] and [A] went. [B] gave it to", "space"),
            ("Then, [B]s and [A] went. [B] gave it to", "followed"),
            ("Then, [B] and [A] went. [B] gave it to ", "whitespace"),
        ];
        for (t, want) in bad {
            let e = Template::parse_baba(t).unwrap_err();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }

    #[test]
    fn builtin_lists_are_single_tokens() {
        let tok = gpt2();
        assert!(NAMES.len() >= 90, "{}", NAMES.len());
        let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        let checked = check_names("t", &names, &tok).unwrap();
        assert_eq!(checked.len(), NAMES.len(), "duplicate built-in names");
        assert_eq!(checked.iter().find(|(n, _)| n == "Sarah").unwrap().1, 10490);
    }

    #[test]
    fn multi_token_name_is_named() {
        let tok = gpt2();
        let names = vec!["Mary".to_string(), "Bartholomew".to_string()];
        let e = check_names("t", &names, &tok).unwrap_err().to_string();
        assert!(e.contains("'Bartholomew'"), "{e}");
        assert!(e.contains("tokens"), "{e}");
        let e = check_names("t", &["Mary".into(), "Mary".into()], &tok)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two different"), "{e}");
        let e = check_names("t", &[" Mary".into(), "John".into()], &tok)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without spaces"), "{e}");
    }
}
