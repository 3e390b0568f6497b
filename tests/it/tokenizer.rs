//! The bundled GPT-2 tokenizer (shipped with the tiny checkpoint, `experiments/checkpoints/tiny-gpt2`) against the reference encodings in
//! shared/data/gpt2/README.md.

use hookgraph::tokenizer::GptTokenizer;

fn gpt2() -> GptTokenizer {
    let dir = crate::common::root().join("experiments/checkpoints/tiny-gpt2");
    GptTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap()
}

#[test]
fn bundled_gpt2_tokenizer_matches_reference_encoding() {
    let tok = gpt2();
    let ids = tok
        .encode("Then, Sarah and Arthur had a lot of fun at the hospital. Arthur gave a bone to")
        .unwrap();
    assert_eq!(
        ids,
        [
            6423, 11, 10490, 290, 13514, 550, 257, 1256, 286, 1257, 379, 262, 4436, 13, 13514,
            2921, 257, 9970, 284
        ]
    );
    assert_eq!(tok.encode(" Sarah").unwrap(), [10490]);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50256));
    assert_eq!(tok.vocab_size(), 50257);
}

#[test]
fn endoftext_is_one_special_token() {
    let tok = gpt2();
    assert_eq!(tok.encode("<|endoftext|>Hi").unwrap()[0], 50256);
    assert_eq!(tok.decode_one(10490), " Sarah");
}
