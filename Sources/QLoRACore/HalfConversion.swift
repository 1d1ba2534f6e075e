// Exact conversions between f32 and the 16-bit float formats (IEEE binary16 and bfloat16).
// Narrowing rounds to nearest, ties to even; NaN stays NaN (quiet), as numpy and torch do.

/// Widens IEEE half-precision bits to f32 exactly (subnormals, infinities and NaN payloads kept).
@inline(__always)
public func float16BitsToFloat(_ h: UInt16) -> Float {
    let sign = UInt32(h & 0x8000) << 16
    let exponent = UInt32(h >> 10) & 0x1F
    let mantissa = UInt32(h & 0x03FF)
    if exponent == 0x1F {  // inf or NaN: keep the payload in the top mantissa bits
        return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
    }
    if exponent == 0 {
        if mantissa == 0 { return Float(bitPattern: sign) }
        // Subnormal half: value = mantissa * 2^-24, exact in f32.
        let magnitude = Float(mantissa) * Float(bitPattern: 0x3380_0000)  // 2^-24
        return sign == 0 ? magnitude : -magnitude
    }
    return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
}

/// Narrows f32 to IEEE half-precision bits, rounding to nearest even; overflow gives infinity.
@inline(__always)
public func floatToFloat16Bits(_ f: Float) -> UInt16 {
    let bits = f.bitPattern
    let sign = UInt16((bits >> 16) & 0x8000)
    let exponent = Int((bits >> 23) & 0xFF)
    let mantissa = bits & 0x007F_FFFF
    if exponent == 0xFF {
        if mantissa == 0 { return sign | 0x7C00 }
        // NaN: keep the top payload bits, force the quiet bit.
        return sign | 0x7E00 | UInt16(mantissa >> 13)
    }
    let halfExponent = exponent - 127 + 15
    if halfExponent >= 0x1F { return sign | 0x7C00 }
    if halfExponent <= 0 {
        // Subnormal or zero in half precision.
        if halfExponent < -10 { return sign }
        let full = mantissa | 0x0080_0000
        let shift = UInt32(14 - halfExponent)
        var half = full >> shift
        let remainder = full & ((1 << shift) - 1)
        let halfway = UInt32(1) << (shift - 1)
        if remainder > halfway || (remainder == halfway && (half & 1) == 1) { half += 1 }
        return sign | UInt16(half)
    }
    var half = UInt32(halfExponent) << 10 | (mantissa >> 13)
    let remainder = mantissa & 0x1FFF
    if remainder > 0x1000 || (remainder == 0x1000 && (half & 1) == 1) { half += 1 }  // may carry into inf
    return sign | UInt16(half)
}

/// Widens bfloat16 bits to f32 (exact: bf16 is the top half of an f32).
@inline(__always)
public func bfloat16BitsToFloat(_ b: UInt16) -> Float {
    Float(bitPattern: UInt32(b) << 16)
}

/// Narrows f32 to bfloat16 bits, rounding to nearest even; NaN becomes a quiet NaN.
@inline(__always)
public func floatToBFloat16Bits(_ f: Float) -> UInt16 {
    let bits = f.bitPattern
    if f.isNaN { return UInt16(bits >> 16) | 0x0040 }
    let rounding = UInt32(0x7FFF) + ((bits >> 16) & 1)
    return UInt16((bits &+ rounding) >> 16)
}

/// Converts `count` elements of `dtype` at `source` to f32 at `destination`.
/// Integer types convert by value; BOOL gives 0 or 1.
public func convertToFloat32(
    _ destination: UnsafeMutablePointer<Float>, from source: UnsafeRawPointer, dtype: DType, count: Int
) {
    switch dtype {
    case .f32:
        UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 4)
    case .f16:
        for i in 0..<count { destination[i] = float16BitsToFloat(source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .bf16:
        for i in 0..<count { destination[i] = bfloat16BitsToFloat(source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .f64:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
    case .i64:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
    case .i32:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
    case .i16:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)) }
    case .i8:
        for i in 0..<count { destination[i] = Float(source.load(fromByteOffset: i, as: Int8.self)) }
    case .u64:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)) }
    case .u32:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)) }
    case .u16:
        for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .u8, .bool:
        for i in 0..<count { destination[i] = Float(source.load(fromByteOffset: i, as: UInt8.self)) }
    }
}
