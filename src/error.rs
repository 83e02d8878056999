use thiserror::Error as ThisError;

/// Every failure of the core. `py::` maps the variants onto Python exception classes:
/// `Value` → `LowbitValueError`, `Type` → `LowbitTypeError`, `Io` → `LowbitIOError`,
/// `Format` → `LowbitFormatError` (a corrupt or foreign file).
#[derive(Debug, ThisError)]
pub enum Error {
    #[error("{0}")]
    Value(String),
    #[error("{0}")]
    Type(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `ensure!(cond, "fmt", args)` returns `Error::Value` when `cond` is false.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::Error::Value(format!($($arg)+)));
        }
    };
}
