// Which BLAS the package was linked with, for `qlora inspect --system`.
#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif

public enum BLASInfo {
    public static var description: String {
        #if canImport(Accelerate)
        return "Accelerate"
        #else
        if let config = openblas_get_config() { return String(cString: config) }
        return "OpenBLAS"
        #endif
    }
}
