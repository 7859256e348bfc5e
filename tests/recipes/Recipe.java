// Recipe.java: java.net.http.HttpClient through the JVM-wide proxy properties
// (-Dhttp.proxyHost, -Dhttps.proxyHost, ...) and the trust store -Djavax.net.ssl.trustStore.
// Run it as `java [properties] Recipe.java URL`; it prints the status, then the body.
// Base-URL mode: just change the URL (the default selector does not proxy 127.0.0.1).
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Recipe {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.getDefault()).build();
        HttpResponse<String> response = client.send(
                HttpRequest.newBuilder(URI.create(args[0])).build(),
                HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.println(response.body());
    }
}
