// A non-owning view of a tensor's bytes: dtype, shape and a pointer, with a reference to the object
// that owns the memory (a MappedFile or a HeapBuffer) so the memory outlives the view.

public struct TensorView: @unchecked Sendable {
    public let dtype: DType
    public let shape: [Int]
    public let bytes: UnsafeRawBufferPointer
    /// Keeps the memory alive.
    public let owner: AnyObject

    public init(dtype: DType, shape: [Int], bytes: UnsafeRawBufferPointer, owner: AnyObject) {
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
        self.owner = owner
    }

    public var elementCount: Int { shape.reduce(1, *) }

    /// The elements converted to f32 (exact for F32, F16, BF16 and small integers).
    public func floats() -> [Float] {
        let n = elementCount
        return [Float](unsafeUninitializedCapacity: n) { buf, count in
            if n > 0 { convertToFloat32(buf.baseAddress!, from: bytes.baseAddress!, dtype: dtype, count: n) }
            count = n
        }
    }

    /// The raw bytes copied out.
    public func byteArray() -> [UInt8] { Array(bytes) }

    /// Reads the elements as `T` (which must match the dtype's size).
    public func values<T>(as type: T.Type) -> [T] {
        if MemoryLayout<T>.size != dtype.byteSize { fatalError("TensorView: \(T.self) does not match \(dtype)") }
        let n = elementCount
        return [T](unsafeUninitializedCapacity: n) { buf, count in
            if n > 0 { UnsafeMutableRawPointer(buf.baseAddress!).copyMemory(from: bytes.baseAddress!, byteCount: n * dtype.byteSize) }
            count = n
        }
    }

    /// A view built over an owned copy of `values`.
    public static func make<T>(_ values: [T], dtype: DType, shape: [Int]) -> TensorView {
        if MemoryLayout<T>.size != dtype.byteSize { fatalError("TensorView: \(T.self) does not match \(dtype)") }
        if values.count != shape.reduce(1, *) { fatalError("TensorView: \(values.count) values for shape \(shape)") }
        let byteCount = values.count * dtype.byteSize
        let buffer = HeapBuffer(byteCount: byteCount)
        if byteCount > 0 { values.withUnsafeBytes { buffer.pointer.copyMemory(from: $0.baseAddress!, byteCount: byteCount) } }
        return TensorView(dtype: dtype, shape: shape, bytes: UnsafeRawBufferPointer(start: buffer.pointer, count: byteCount), owner: buffer)
    }
}
