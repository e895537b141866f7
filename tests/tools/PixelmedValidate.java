// Runs pixelmed's DicomSRValidator over many files in one JVM (one start-up, not one per file),
// one validator per thread, as many threads as processors. Usage:
//   java -cp pixelmed.jar PixelmedValidate.java FILE...
// prints "### FILE" and then that file's report, in the order given.
import com.pixelmed.validate.DicomSRValidator;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class PixelmedValidate {
    private static final ThreadLocal<DicomSRValidator> VALIDATOR = ThreadLocal.withInitial(() -> {
        try {
            return new DicomSRValidator();
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
    });

    private static String report(String path) {
        try {
            // describe, do not match case of code meanings, ambiguous templates, item order, template ID
            return VALIDATOR.get().validate(path, false, false, false, true, true);
        } catch (Exception e) {
            return "Error: validator failed: " + e + "\n";
        }
    }

    public static void main(String[] args) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(Runtime.getRuntime().availableProcessors());
        List<Future<String>> reports = new ArrayList<>();
        for (String path : args) {
            reports.add(pool.submit(() -> report(path)));
        }
        for (int i = 0; i < args.length; i++) {
            System.out.println("### " + args[i]);
            System.out.print(reports.get(i).get());
        }
        pool.shutdown();
    }
}
