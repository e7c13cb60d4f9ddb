//! Who may change upstreams: an optional bearer token that every admin
//! request must carry (`Authorization: Bearer TOKEN`), compared in constant
//! time so the comparison does not tell an attacker how much of a guess was
//! right.

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Wrong,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "this admin interface needs an `Authorization: Bearer TOKEN` header"
            }
            Refusal::Wrong => "the bearer token is wrong",
        }
    }
}

/// Checks an `Authorization` header against `token`.
pub fn check(token: &str, authorization: Option<&str>) -> Result<(), Refusal> {
    let given = authorization
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(Refusal::Missing)?;
    if same_secret(token.as_bytes(), given.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

/// Equality whose time depends only on the lengths, not on where the first
/// difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// Reads a token from a file: its first line, trimmed; empty is an error.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("could not read admin token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!("admin token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        assert_eq!(check("s3cret", Some("Bearer s3cret")), Ok(()));
        assert_eq!(check("s3cret", Some("bearer  s3cret ")), Ok(()));
        assert_eq!(check("s3cret", None), Err(Refusal::Missing));
        assert_eq!(
            check("s3cret", Some("Basic czNjcmV0")),
            Err(Refusal::Missing)
        );
        assert_eq!(check("s3cret", Some("Bearer")), Err(Refusal::Missing));
        assert_eq!(check("s3cret", Some("Bearer ")), Err(Refusal::Missing));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3crets",
            "Bearer S3cret",
            "Bearer x s3cret",
        ] {
            assert_eq!(check("s3cret", Some(wrong)), Err(Refusal::Wrong), "{wrong}");
        }
    }

    #[test]
    fn token_files_give_their_first_line() {
        let dir = crate::testing::TempDir::new();
        let p = dir.path().join("token");
        std::fs::write(&p, "abc123\nignored\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "abc123");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file(&p).unwrap_err().contains("is empty"));
    }
}
