//! String enums: the Python API passes modes, tasks, granularities and methods as strings.
//! Each enum declares its names once (`string_enum!`); `FromStr`, `Display` and `as_str` come
//! from that one table, and a bad name is an error that lists the valid ones.
use crate::Error;

/// The error for a name that is not one of `names`:
/// `granularity must be one of 'tensor', 'channel' or 'group', got "row"`.
pub fn unknown_name(what: &str, names: &[&str], got: &str) -> Error {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    let list = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Error::value(format!("{what} must be one of {list}, got {got:?}"))
}

/// `string_enum!(Mode, "mode", { "fast" => Fast, "slow" => Slow(2) })` implements `FromStr`
/// (`"slow"` parses to `Mode::Slow(2)`; any other name is `unknown_name("mode", …)`),
/// `Display` and `as_str` (the name of each variant, whatever its data), and `NAMES`.
macro_rules! string_enum {
    ($ty:ident, $what:literal, { $($name:literal => $variant:ident $(($arg:expr))?),+ $(,)? }) => {
        impl $ty {
            /// Every name `from_str` accepts, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The name of this value.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($ty::$variant { .. } => $name,)+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                match s {
                    $($name => Ok($ty::$variant $(($arg))?),)+
                    _ => Err($crate::names::unknown_name($what, Self::NAMES, s)),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

#[cfg(test)]
mod tests {
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        Fast,
        Slow(u32),
    }
    string_enum!(Mode, "mode", { "fast" => Fast, "slow" => Slow(2) });

    #[test]
    fn names_parse_print_and_list_themselves() {
        assert_eq!("slow".parse::<Mode>().unwrap(), Mode::Slow(2));
        assert_eq!(Mode::Slow(7).to_string(), "slow");
        assert_eq!(Mode::Fast.as_str(), "fast");
        let err = "Fast".parse::<Mode>().unwrap_err().to_string();
        assert!(
            err.ends_with(r#"mode must be one of 'fast' or 'slow', got "Fast""#),
            "{err}"
        );
        let one = super::unknown_name("x", &["a"], "b").to_string();
        assert!(one.ends_with(r#"x must be one of 'a', got "b""#), "{one}");
    }
}
