// Data-parallel training across processes: every rank holds the same frozen base and the same adapter, runs its
// share of each step's micro-batches, and the LoRA gradients are summed across ranks before clipping and the
// optimizer step, so every rank applies the same update. MPI (OpenMPI) is the transport, loaded at run time with
// dlopen: nothing links against it, so the package builds and runs where it is not installed, and only
// `qlora train` under `mpirun` (or --distributed mpi) needs libmpi.so.40 (Debian's libopenmpi3: apt-get install
// openmpi-bin).
import QLoRACore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a distributed step needs from the transport.
public protocol GradientCommunicator: AnyObject {
    var rank: Int { get }
    var size: Int { get }
    /// Sums `count` floats at `values` over every rank, in place (every rank gets the same sum).
    func sumInPlace(_ values: UnsafeMutablePointer<Float>, count: Int) throws
    /// Sums each entry over every rank.
    func sum(_ values: [Double]) throws -> [Double]
}

public enum DistributedError: Error, CustomStringConvertible, Equatable {
    case libraryMissing(String)
    case call(String, Int32)

    public var description: String {
        switch self {
        case let .libraryMissing(reason):
            return "MPI is not available: \(reason) (install OpenMPI: apt-get install openmpi-bin; launch with mpirun -np N qlora train ...)"
        case let .call(name, code): return "\(name) failed with MPI error \(code)"
        }
    }
}

/// OpenMPI through dlopen. Its handles are the addresses of its predefined objects (ompi_mpi_comm_world,
/// ompi_mpi_float, ompi_mpi_double, ompi_mpi_op_sum); MPI_IN_PLACE is the address 1.
public final class MPICommunicator: GradientCommunicator {
    public let rank: Int
    public let size: Int
    private let allreduce: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int32, UnsafeMutableRawPointer?, UnsafeMutableRawPointer?,
                                           UnsafeMutableRawPointer?) -> Int32
    private let finalizeCall: @convention(c) () -> Int32
    private let world, floatType, doubleType, sumOp: UnsafeMutableRawPointer

    /// The launcher's environment says this process is one of several ranks (OpenMPI's mpirun, or MPICH's).
    public static var launchedByMPI: Bool {
        let size = Environment.get("OMPI_COMM_WORLD_SIZE") ?? Environment.get("PMI_SIZE")
        return (size.flatMap { Int($0) } ?? 1) > 1
    }

    /// Ranks on this machine, from the launcher (for splitting its cores between them).
    public static var localSize: Int { Environment.get("OMPI_COMM_WORLD_LOCAL_SIZE").flatMap { Int($0) } ?? 1 }

    /// Loads OpenMPI and calls MPI_Init (once per process).
    public init() throws {
        guard let lib = dlopen("libmpi.so.40", RTLD_NOW | RTLD_GLOBAL) ?? dlopen("libmpi.so", RTLD_NOW | RTLD_GLOBAL) else {
            throw DistributedError.libraryMissing(dlerror().map { String(cString: $0) } ?? "libmpi.so.40 not found")
        }
        func symbol(_ name: String) throws -> UnsafeMutableRawPointer {
            guard let s = dlsym(lib, name) else {
                throw DistributedError.libraryMissing("\(name) is not in libmpi (OpenMPI is required; MPICH's handles are not addresses)")
            }
            return s
        }
        typealias Init = @convention(c) (UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> Int32
        typealias Initialized = @convention(c) (UnsafeMutablePointer<Int32>) -> Int32
        typealias CommQuery = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<Int32>) -> Int32
        let initialize = unsafeBitCast(try symbol("MPI_Init"), to: Init.self)
        let initialized = unsafeBitCast(try symbol("MPI_Initialized"), to: Initialized.self)
        let commRank = unsafeBitCast(try symbol("MPI_Comm_rank"), to: CommQuery.self)
        let commSize = unsafeBitCast(try symbol("MPI_Comm_size"), to: CommQuery.self)
        allreduce = unsafeBitCast(try symbol("MPI_Allreduce"), to: (@convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int32, UnsafeMutableRawPointer?,
                                                                                  UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Int32).self)
        finalizeCall = unsafeBitCast(try symbol("MPI_Finalize"), to: (@convention(c) () -> Int32).self)
        world = try symbol("ompi_mpi_comm_world")
        floatType = try symbol("ompi_mpi_float")
        doubleType = try symbol("ompi_mpi_double")
        sumOp = try symbol("ompi_mpi_op_sum")
        var flag: Int32 = 0
        _ = initialized(&flag)
        if flag == 0 {
            let code = initialize(nil, nil)
            guard code == 0 else { throw DistributedError.call("MPI_Init", code) }
        }
        var r: Int32 = 0, s: Int32 = 0
        var code = commRank(world, &r)
        guard code == 0 else { throw DistributedError.call("MPI_Comm_rank", code) }
        code = commSize(world, &s)
        guard code == 0 else { throw DistributedError.call("MPI_Comm_size", code) }
        rank = Int(r)
        size = Int(s)
    }

    public func sumInPlace(_ values: UnsafeMutablePointer<Float>, count: Int) throws {
        // In pieces below 2^31 elements (MPI counts are int).
        var offset = 0
        while offset < count {
            let n = min(count - offset, Int(Int32.max))
            let code = allreduce(UnsafeRawPointer(bitPattern: 1), values + offset, Int32(n), floatType, sumOp, world)
            guard code == 0 else { throw DistributedError.call("MPI_Allreduce", code) }
            offset += n
        }
    }

    public func sum(_ values: [Double]) throws -> [Double] {
        var out = values
        let code = out.withUnsafeMutableBufferPointer { o in
            values.withUnsafeBufferPointer { v in allreduce(v.baseAddress, o.baseAddress, Int32(values.count), doubleType, sumOp, world) }
        }
        guard code == 0 else { throw DistributedError.call("MPI_Allreduce", code) }
        return out
    }

    /// MPI_Finalize: call once, after the last collective call, before the process exits.
    public func finalize() { _ = finalizeCall() }
}
