// AdamW for the LoRA parameters: 32-bit (torch.optim.AdamW's arithmetic), 8-bit (bitsandbytes'
// blockwise AdamW8bit as its CPU backend computes it: both moments in the 8-bit dynamic maps, blocks of
// 256, tensors under 4096 elements kept in 32-bit), and paged variants whose state lives in a memory-
// mapped file that the kernel may write back and evict under memory pressure (QLoRA paper, §3, Paged
// Optimizers). Order of operations: scripts/reference/TRAINING_NOTES.md, sections 4 and 5.
import QLoRACore
import QLoRAKernels

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum OptimizerKind: String, CaseIterable, Sendable {
    case adamw32 = "adamw_32bit"
    case adamw8 = "adamw_8bit"
    case pagedAdamw32 = "paged_adamw_32bit"
    case pagedAdamw8 = "paged_adamw_8bit"

    public var is8Bit: Bool { self == .adamw8 || self == .pagedAdamw8 }
    public var isPaged: Bool { self == .pagedAdamw32 || self == .pagedAdamw8 }
}

public struct AdamWConfig: Sendable, Equatable {
    public var beta1: Double = 0.9
    public var beta2: Double = 0.999
    public var eps: Double = 1e-8
    /// The paper's default is 0 (Guanaco); bitsandbytes' AdamW8bit defaults to 0.01.
    public var weightDecay: Double = 0

    public init() {}
}

/// Memory for optimizer state: the heap, or a file mapping the kernel may page out.
final class StateBuffer {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int
    let paged: Bool

    init(byteCount: Int, paged: Bool) throws {
        self.byteCount = max(byteCount, 1)
        self.paged = paged
        if paged {
            // An unlinked temporary file, mapped shared: dirty pages can be written back and dropped.
            let dir = Environment.get("TMPDIR") ?? "/tmp"
            var template = Array("\(dir)/qlora-optimizer-XXXXXX".utf8CString)
            let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
            guard fd >= 0 else { throw SystemError(call: "mkstemp", path: dir, code: errno) }
            let path = String(cString: template)
            defer { close(fd); unlink(path) }
            guard ftruncate(fd, off_t(self.byteCount)) == 0 else { throw SystemError(call: "ftruncate", path: path, code: errno) }
            guard let p = mmap(nil, self.byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
                throw SystemError(call: "mmap", path: path, code: errno)
            }
            pointer = p
        } else {
            pointer = UnsafeMutableRawPointer.allocate(byteCount: self.byteCount, alignment: 64)
            pointer.initializeMemory(as: UInt8.self, repeating: 0, count: self.byteCount)
        }
    }

    deinit {
        if paged { munmap(pointer, byteCount) } else { pointer.deallocate() }
    }

    /// Paged state leaves this process's memory between updates: its pages go back to the file's page
    /// cache (written back by the kernel in its own time), where they cost nothing while memory is
    /// plentiful (the next update maps them again without reading the disk) and can be written out and
    /// dropped under pressure, which anonymous memory on a machine without swap never can.
    /// Releases the whole pages inside bytes [from, to) of a paged state (nothing for an unpaged one);
    /// returns where the next release should start.
    @discardableResult
    func release(from: Int, to: Int) -> Int {
        guard paged else { return to }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (from + page - 1) / page * page
        let end = to >= byteCount ? byteCount : to / page * page
        if end > start { madvise(pointer + start, end - start, MADV_DONTNEED) }
        return max(from, end)
    }

    func floats(_ offset: Int, _ count: Int) -> UnsafeMutableBufferPointer<Float> {
        UnsafeMutableBufferPointer(start: (pointer + offset).assumingMemoryBound(to: Float.self), count: count)
    }

    func bytes(_ offset: Int, _ count: Int) -> UnsafeMutableBufferPointer<UInt8> {
        UnsafeMutableBufferPointer(start: (pointer + offset).assumingMemoryBound(to: UInt8.self), count: count)
    }
}

public final class AdamW {
    public let kind: OptimizerKind
    public let config: AdamWConfig
    /// Tensors as (offset, count) ranges of the flat parameter vector.
    public let tensors: [(offset: Int, count: Int)]
    public private(set) var step = 0
    /// Per tensor, a factor on the learning rate (and so on its weight decay, as torch's per-group lr does): LoRA+
    /// gives each B tensor the ratio, as PEFT's create_loraplus_optimizer puts B in a group with lr x ratio. nil: 1.
    public var learningRateScales: [Double]?

    /// bitsandbytes keeps tensors smaller than this in 32-bit state.
    public static let min8BitSize = 4096
    public static let blockSize = 256

    struct Layout {
        let use8Bit: Bool
        /// Byte offsets of m and v (f32 [count] each, or u8 [count] each) and, for 8-bit, absmax f32 [blocks] each.
        let m: Int, v: Int, absmaxM: Int, absmaxV: Int
        /// Where this tensor's state begins (m comes first).
        var start: Int { m }
    }

    let layouts: [Layout]
    let state: StateBuffer

    public init(kind: OptimizerKind, config: AdamWConfig = AdamWConfig(), tensors: [(offset: Int, count: Int)]) throws {
        self.kind = kind
        self.config = config
        self.tensors = tensors
        var layouts: [Layout] = []
        var bytes = 0
        func take(_ n: Int) -> Int { defer { bytes += (n + 63) / 64 * 64 }; return bytes }
        for t in tensors {
            let use8 = kind.is8Bit && t.count >= Self.min8BitSize
            if use8 {
                let blocks = (t.count + Self.blockSize - 1) / Self.blockSize
                layouts.append(Layout(use8Bit: true, m: take(t.count), v: take(t.count), absmaxM: take(4 * blocks), absmaxV: take(4 * blocks)))
            } else {
                layouts.append(Layout(use8Bit: false, m: take(4 * t.count), v: take(4 * t.count), absmaxM: 0, absmaxV: 0))
            }
        }
        self.layouts = layouts
        state = try StateBuffer(byteCount: bytes, paged: kind.isPaged)
    }

    /// Bytes of optimizer state.
    public var stateBytes: Int { state.byteCount }

    /// One update of `parameters` from `gradients` with learning rate `lr`.
    public func update(parameters: UnsafeMutableBufferPointer<Float>, gradients: UnsafeBufferPointer<Float>, lr baseLR: Double) {
        step += 1
        let t = Double(step)
        let b1 = config.beta1, b2 = config.beta2
        let oneMinusB1 = Float(1 - b1), oneMinusB2 = Float(1 - b2), fb1 = Float(b1), fb2 = Float(b2)
        // Paged state is released tensor by tensor as the update passes, so at most about one tensor's
        // state is resident at a time.
        var released = 0
        for (k, tensor) in tensors.enumerated() {
            let lr = baseLR * (learningRateScales?[k] ?? 1)
            let decay = Float(1 - lr * config.weightDecay)
            defer { released = state.release(from: released, to: k + 1 < layouts.count ? layouts[k + 1].start : state.byteCount) }
            let layout = layouts[k]
            let p = UnsafeMutableBufferPointer(rebasing: parameters[tensor.offset..<(tensor.offset + tensor.count)])
            let g = UnsafeBufferPointer(rebasing: gradients[tensor.offset..<(tensor.offset + tensor.count)])
            if !layout.use8Bit && !kind.is8Bit {
                // torch.optim.AdamW (single-tensor path).
                let m = state.floats(layout.m, tensor.count), v = state.floats(layout.v, tensor.count)
                let bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t)
                let stepSize = Float(-(lr / bc1))
                let bc2Sqrt = Float(bc2.squareRoot()), feps = Float(config.eps)
                for i in 0..<tensor.count {
                    if config.weightDecay != 0 { p[i] *= decay }
                    m[i] = m[i].addingProduct(oneMinusB1, g[i] - m[i])  // exp_avg.lerp_(g, 1 − β1): fma(w, g − m, m)
                    v[i] = (v[i] * fb2).addingProduct(oneMinusB2 * g[i], g[i])
                    let denom = v[i].squareRoot() / bc2Sqrt + feps
                    p[i] = p[i] + (stepSize * m[i]) / denom
                }
            } else if !layout.use8Bit {
                // bitsandbytes' 32-bit path for small tensors of an 8-bit optimizer (eps scaled by c2).
                let m = state.floats(layout.m, tensor.count), v = state.floats(layout.v, tensor.count)
                let c1 = 1 - pow(b1, t), c2 = (1 - pow(b2, t)).squareRoot()
                let stepSize = Float(-lr * c2 / c1), epsC2 = Float(config.eps * c2)
                for i in 0..<tensor.count {
                    m[i] = (m[i] * fb1).addingProduct(g[i], oneMinusB1)
                    v[i] = (v[i] * fb2).addingProduct(oneMinusB2 * g[i], g[i])
                    if config.weightDecay > 0 { p[i] *= decay }
                    let update = m[i] / (v[i].squareRoot() + epsC2)
                    p[i] = p[i].addingProduct(update, stepSize)
                }
            } else {
                update8Bit(p, g, layout: layout, count: tensor.count, t: t, lr: lr)
            }
        }
    }

    /// bitsandbytes' blockwise 8-bit AdamW step on the CPU: dequantize both moments, update them in f32,
    /// update the parameter from the unquantized moments, requantize (LUT quantizer, blocks of 256).
    func update8Bit(_ p: UnsafeMutableBufferPointer<Float>, _ g: UnsafeBufferPointer<Float>, layout: Layout, count n: Int, t: Double, lr: Double) {
        let b1 = config.beta1, b2 = config.beta2
        let oneMinusB1 = Float(1 - b1), oneMinusB2 = Float(1 - b2), fb1 = Float(b1), fb2 = Float(b2)
        let blocks = (n + Self.blockSize - 1) / Self.blockSize
        let q1 = state.bytes(layout.m, n), q2 = state.bytes(layout.v, n)
        let a1 = state.floats(layout.absmaxM, blocks), a2 = state.floats(layout.absmaxV, blocks)
        var s1 = [Float](repeating: 0, count: n), s2 = s1
        let code1 = Codebooks.dynamic8, code2 = Codebooks.dynamic8Unsigned
        let c1 = 1 - pow(b1, t), c2 = (1 - pow(b2, t)).squareRoot()
        let fc2 = Float(c2), feps = Float(config.eps), stepSize = Float(-lr / c1)
        let decay = Float(1 - lr * config.weightDecay)
        for i in 0..<n {
            let blk = i / Self.blockSize
            var m = code1[Int(q1[i])] * a1[blk]
            var v = code2[Int(q2[i])] * a2[blk]
            m = (m * fb1).addingProduct(g[i], oneMinusB1)
            v = (v * fb2).addingProduct(oneMinusB2 * g[i], g[i])
            s1[i] = m
            s2[i] = v
            let denom = v.squareRoot() / fc2 + feps
            if config.weightDecay > 0 { p[i] *= decay }
            p[i] = p[i] + (stepSize * m) / denom
        }
        s1.withUnsafeBufferPointer { Blockwise8.quantize($0, into: q1, absmax: a1, blockSize: Self.blockSize, unsigned: false) }
        s2.withUnsafeBufferPointer { Blockwise8.quantize($0, into: q2, absmax: a2, blockSize: Self.blockSize, unsigned: true) }
    }

    /// The whole state as bytes (for checkpoints) and the step count.
    public func serializedState() -> [UInt8] {
        var out = Array(Self.stateMagic.utf8)
        func u32(_ v: Int) { withUnsafeBytes(of: UInt32(v).littleEndian) { out += $0 } }
        func u64(_ v: Int) { withUnsafeBytes(of: UInt64(v).littleEndian) { out += $0 } }
        u32(Self.stateVersion)
        let kindName = Array(kind.rawValue.utf8)
        u32(kindName.count)
        out += kindName
        u64(tensors.count)
        for (t, l) in zip(tensors, layouts) {
            u64(t.count)
            out.append(l.use8Bit ? 1 : 0)
        }
        let payload = UnsafeRawBufferPointer(start: state.pointer, count: state.byteCount)
        u64(payload.count)
        u32(Int(CRC32C.checksum(payload)))
        out += payload
        return out
    }

    /// The first bytes of `serializedState`, and its version.
    static let stateMagic = "QLORAOPT"
    static let stateVersion = 1

    /// Restores what `serializedState` returned: the header must name this optimizer kind and tensor layout,
    /// and the state must match its checksum. `legacy`: a checkpoint of format 1, whose optimizer.bin is the
    /// bare state (no header, no checksum).
    public func restore(state bytes: [UInt8], step: Int, legacy: Bool = false) throws {
        var payloadStart = 0
        if !legacy {
            var at = 0
            func take(_ n: Int) throws -> ArraySlice<UInt8> {
                guard n >= 0, at + n <= bytes.count else { throw OptimizerStateError("it ends inside its header") }
                defer { at += n }
                return bytes[at..<(at + n)]
            }
            func integer(_ n: Int) throws -> Int {
                var v = 0
                for (i, b) in try take(n).enumerated() { v |= Int(b) << (8 * i) }
                return v
            }
            guard try take(Self.stateMagic.utf8.count).elementsEqual(Self.stateMagic.utf8) else {
                throw OptimizerStateError("it is not swift-qlora optimizer state (no \(Self.stateMagic) header)")
            }
            let version = try integer(4)
            guard version == Self.stateVersion else {
                throw OptimizerStateError("optimizer state version \(version); this version of swift-qlora reads version \(Self.stateVersion)")
            }
            let kindName = String(decoding: try take(try integer(4)), as: UTF8.self)
            guard kindName == kind.rawValue else { throw OptimizerStateError("it holds \(kindName) state; this run uses \(kind.rawValue)") }
            let count = try integer(8)
            guard count == tensors.count else { throw OptimizerStateError("it holds \(count) tensors; this adapter has \(tensors.count)") }
            for (k, (t, l)) in zip(tensors, layouts).enumerated() {
                let n = try integer(8), eight = try integer(1)
                guard n == t.count, (eight == 1) == l.use8Bit else {
                    throw OptimizerStateError("tensor \(k) has \(n) values (\(eight == 1 ? "8" : "32")-bit); this adapter's has \(t.count)")
                }
            }
            let size = try integer(8), checksum = try integer(4)
            guard size == state.byteCount, at + size == bytes.count else {
                throw OptimizerStateError("\(bytes.count - at) bytes of state, expected \(state.byteCount)")
            }
            guard Int(CRC32C.checksum(bytes[at...])) == checksum else {
                throw OptimizerStateError("the state does not match its checksum: the file is corrupted")
            }
            payloadStart = at
        } else {
            guard bytes.count == state.byteCount else {
                throw OptimizerStateError("\(bytes.count) bytes, expected \(state.byteCount)")
            }
        }
        if state.byteCount > 0 { bytes.withUnsafeBytes { state.pointer.copyMemory(from: $0.baseAddress! + payloadStart, byteCount: state.byteCount) } }
        self.step = step
    }

    /// The state of tensor `k`: f32 moments, or the 8-bit codes and block absmax.
    public func moments(of k: Int) -> (m: [Float], v: [Float]) {
        let l = layouts[k], n = tensors[k].count
        if !l.use8Bit { return (Array(state.floats(l.m, n)), Array(state.floats(l.v, n))) }
        let blocks = (n + Self.blockSize - 1) / Self.blockSize
        let q1 = state.bytes(l.m, n), q2 = state.bytes(l.v, n), a1 = state.floats(l.absmaxM, blocks), a2 = state.floats(l.absmaxV, blocks)
        return ((0..<n).map { Codebooks.dynamic8[Int(q1[$0])] * a1[$0 / Self.blockSize] },
                (0..<n).map { Codebooks.dynamic8Unsigned[Int(q2[$0])] * a2[$0 / Self.blockSize] })
    }

    /// The raw 8-bit state of tensor `k` (codes and absmax of both moments), nil for a 32-bit tensor.
    public func quantizedState(of k: Int) -> (q1: [UInt8], absmax1: [Float], q2: [UInt8], absmax2: [Float])? {
        let l = layouts[k], n = tensors[k].count
        guard l.use8Bit else { return nil }
        let blocks = (n + Self.blockSize - 1) / Self.blockSize
        return (Array(state.bytes(l.m, n)), Array(state.floats(l.absmaxM, blocks)), Array(state.bytes(l.v, n)), Array(state.floats(l.absmaxV, blocks)))
    }
}

/// Why saved optimizer state cannot be restored (the caller names the file).
public struct OptimizerStateError: Error, CustomStringConvertible {
    public let reason: String
    init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}
