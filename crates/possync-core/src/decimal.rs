//! Exact decimal amounts (money, quantities, rates).
//!
//! Values are `rust_decimal::Decimal`, stored in SQLite as canonical text and carried in JSON as
//! numbers. Inputs may be JSON numbers or strings; anything with more than
//! [`MAX_SIGNIFICANT_DIGITS`] significant digits is refused, which guarantees that the JSON
//! number written back (an `f64` printed in its shortest form) has exactly the same decimal text.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serializer};

/// Most significant digits an amount may carry (an `f64` round-trips 15).
pub const MAX_SIGNIFICANT_DIGITS: u32 = 15;

/// Why a JSON value is not an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// Neither a JSON number nor a numeric string.
    #[error("expected a decimal number")]
    NotANumber,
    /// More significant digits than can be carried exactly.
    #[error("more than {MAX_SIGNIFICANT_DIGITS} significant digits")]
    TooPrecise,
}

/// Parses an amount from JSON text of a number or string.
pub fn parse(raw: &str) -> Result<Decimal, DecimalError> {
    let value = Decimal::from_str(raw.trim())
        .or_else(|_| Decimal::from_scientific(raw.trim()))
        .map_err(|_| DecimalError::NotANumber)?
        .normalize();
    let digits = value.mantissa().unsigned_abs().checked_ilog10().map_or(1, |d| d + 1);
    if digits > MAX_SIGNIFICANT_DIGITS {
        return Err(DecimalError::TooPrecise);
    }
    Ok(value)
}

/// Parses an amount this program stored itself (a cached stock, a sum): no limit on the
/// number of digits, since sums of valid amounts can be longer than any one input.
pub fn parse_stored(raw: &str) -> Result<Decimal, DecimalError> {
    Decimal::from_str(raw.trim()).map(|value| value.normalize()).map_err(|_| DecimalError::NotANumber)
}

/// Parses an amount from a JSON value (number or string).
pub fn from_json(value: &serde_json::Value) -> Result<Decimal, DecimalError> {
    match value {
        serde_json::Value::Number(number) => parse(&number.to_string()),
        serde_json::Value::String(text) => parse(text),
        _ => Err(DecimalError::NotANumber),
    }
}

/// The JSON number for an amount (exact for amounts accepted by [`parse`]).
pub fn to_json(value: Decimal) -> serde_json::Value {
    serde_json::Number::from_f64(to_f64(value)).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// The `f64` nearest to the amount. Read from its decimal text (Rust's parse rounds
/// correctly), not with `Decimal::to_f64`, whose arithmetic is off by an ulp at large scales:
/// for an amount of at most [`MAX_SIGNIFICANT_DIGITS`] digits the nearest `f64` prints back
/// as exactly those digits, an ulp off does not (found by the `decimal` fuzz target:
/// `.0022000914000001400e-08` was accepted, then its JSON number refused as too precise).
fn to_f64(value: Decimal) -> f64 {
    value.to_string().parse().unwrap_or(f64::NAN)
}

/// Canonical text form, as stored in SQLite.
pub fn to_text(value: Decimal) -> String {
    value.normalize().to_string()
}

/// Serde adapter: `#[serde(with = "possync_core::decimal::json")]`.
pub mod json {
    use super::*;

    /// Writes the amount as a JSON number.
    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(to_f64(*value))
    }

    /// Reads an amount from a JSON number or string.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        from_json(&value).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for `Option<Decimal>`.
pub mod json_opt {
    use super::*;

    /// Writes the amount as a JSON number, or null.
    pub fn serialize<S: Serializer>(value: &Option<Decimal>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => json::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Reads an optional amount.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Decimal>, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.is_null() {
            return Ok(None);
        }
        from_json(&value).map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_round_trip_exactly_through_json_numbers() {
        // The last one is the `decimal` fuzz target's first find.
        for raw in ["12.34", "0.1", "19.99", "123456789012.345", "-3", "0.001", ".0022000914000001400e-08"] {
            let value = parse(raw).unwrap();
            let json = to_json(value).to_string();
            assert_eq!(parse(&json).unwrap(), value, "{raw} -> {json}");
        }
        assert_eq!(to_text(parse("12.50").unwrap()), "12.5");
        assert_eq!(parse("1234567890123456"), Err(DecimalError::TooPrecise));
        assert_eq!(parse("abc"), Err(DecimalError::NotANumber));
        assert_eq!(from_json(&serde_json::json!(true)), Err(DecimalError::NotANumber));
    }
}
