// One view over the checkpoint formats that hold named tensors (safetensors files and folders, GGUF),
// for tools that walk every tensor: quantize and inspect.
import QLoRACore

/// What a tool needs to know about one tensor before reading it.
public struct TensorInfo: Sendable {
    public let name: String
    /// Row-major shape.
    public let shape: [Int]
    /// The storage type as its format names it ("F32", "BF16", "Q4_1", ...).
    public let storage: String
    /// The safetensors dtype when the bytes are a plain element type; nil for block-quantized storage.
    public let dtype: DType?
    public let byteCount: Int
    /// Floating-point data (plain or block-quantized), as opposed to integers or raw bytes.
    public let isFloatingPoint: Bool

    public var elementCount: Int { shape.reduce(1, *) }
}

public protocol TensorSource: AnyObject {
    var path: String { get }
    /// Tensor names in file order.
    var tensorNames: [String] { get }
    func info(_ name: String) -> TensorInfo?
    /// The tensor as f32 (dequantized if needed).
    func floats(_ name: String) throws -> [Float]
    /// A zero-copy view for plain element types; nil for block-quantized tensors.
    func plainView(_ name: String) -> TensorView?
    /// The files read.
    var filePaths: [String] { get }
    /// Lets the pages of a tensor's bytes leave memory (after they were read), to keep the resident set
    /// small while a whole checkpoint streams through.
    func releasePages(_ name: String)
}

/// Opens a .gguf file, a .safetensors file, or a model folder.
public func openTensorSource(_ path: String) throws -> TensorSource {
    if path.lowercased().hasSuffix(".gguf") { return try GGUFFile(path: path) }
    return try TensorCollection(path: path)
}

extension TensorCollection: TensorSource {
    public var tensorNames: [String] { names }
    public var filePaths: [String] { files.map(\.path) }

    public func info(_ name: String) -> TensorInfo? {
        guard let e = entry(name) else { return nil }
        return TensorInfo(name: name, shape: e.shape, storage: e.dtype.rawValue, dtype: e.dtype, byteCount: e.byteCount,
                          isFloatingPoint: e.dtype.isFloatingPoint)
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let t = tensor(name) else { throw SafetensorsError.missingTensor(file: path, tensor: name) }
        return t.floats()
    }

    public func plainView(_ name: String) -> TensorView? { tensor(name) }

    public func releasePages(_ name: String) {
        guard let path = file(of: name), let f = files.first(where: { $0.path == path }), let e = f.entry(name) else { return }
        f.releasePages(e)
    }
}

extension GGUFFile: TensorSource {
    public var tensorNames: [String] { tensors.map(\.name) }
    public var filePaths: [String] { [path] }

    public func info(_ name: String) -> TensorInfo? {
        guard let t = tensor(name) else { return nil }
        return TensorInfo(name: name, shape: t.shape, storage: t.type.description, dtype: t.type.plainDType,
                          byteCount: t.byteCount, isFloatingPoint: true)
    }

    public func floats(_ name: String) throws -> [Float] {
        guard let t = tensor(name) else { throw GGUFError.invalidTensor(file: path, tensor: name, reason: "no such tensor") }
        return try floats(t)
    }

    public func plainView(_ name: String) -> TensorView? {
        guard let t = tensor(name), let dtype = t.type.plainDType else { return nil }
        return TensorView(dtype: dtype, shape: t.shape, bytes: bytes(of: t), owner: mapping)
    }

    public func releasePages(_ name: String) {
        guard let t = tensor(name) else { return }
        mapping.releasePages((dataStart + t.offset)..<(dataStart + t.offset + t.byteCount))
    }
}
