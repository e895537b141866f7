// Runs pixelmed's DicomSRValidator over many files in one JVM (one start-up, not one per file).
// Usage: java -cp pixelmed.jar PixelmedValidate.java FILE...; prints "### FILE" before each report.
import com.pixelmed.validate.DicomSRValidator;

public class PixelmedValidate {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("### " + path);
            try {
                // describe, do not match case of code meanings, ambiguous templates, content item order, template ID
                System.out.print(validator.validate(path, false, false, false, true, true));
            } catch (Exception e) {
                System.out.println("Error: validator failed: " + e);
            }
            System.out.flush();
        }
    }
}
