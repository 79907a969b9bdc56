//! Every token's bytes, as constrained decoding checks them against the grammar.

use super::Tokenizer;

/// Every token's bytes (byte-level BPE pieces mapped back to raw bytes; added tokens as their
/// text); `None` for special tokens, which never belong in JSON.
#[derive(Debug)]
pub struct TokenBytes(Vec<Option<Vec<u8>>>);

impl TokenBytes {
    pub fn from_tokenizer(tok: &Tokenizer, vocab_size: usize) -> Self {
        let inner = tok.inner();
        let added = inner.get_added_tokens_decoder();
        let unicode_to_byte = byte_level_inverse();
        let table = (0..vocab_size as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    return (!t.special).then(|| t.content.as_bytes().to_vec());
                }
                let piece = inner.id_to_token(id)?;
                let mut bytes = Vec::with_capacity(piece.len());
                for c in piece.chars() {
                    match unicode_to_byte(c) {
                        Some(b) => bytes.push(b),
                        // Not a byte-level vocabulary: decode the token on its own.
                        None => return tok.decode(&[id], false).ok().map(String::into_bytes),
                    }
                }
                Some(bytes)
            })
            .collect();
        TokenBytes(table)
    }

    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.0.get(id as usize)?.as_deref()
    }
}

/// The inverse of GPT-2's byte-to-unicode table used by byte-level BPE.
fn byte_level_inverse() -> impl Fn(char) -> Option<u8> {
    let direct =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let shifted: Vec<u8> = (0u32..256)
        .filter(|&b| !direct(b))
        .map(|b| b as u8)
        .collect();
    move |c: char| {
        let u = c as u32;
        if u < 256 && direct(u) {
            Some(u as u8)
        } else if (256..256 + shifted.len() as u32).contains(&u) {
            Some(shifted[(u - 256) as usize])
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_inverse_roundtrips() {
        let inv = byte_level_inverse();
        assert_eq!(inv('A'), Some(b'A'));
        assert_eq!(inv('Ġ'), Some(b' '));
        assert_eq!(inv('Ċ'), Some(b'\n'));
        assert_eq!(inv('Ā'), Some(0));
    }
}
