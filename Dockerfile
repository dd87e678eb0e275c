# BlazeDB node image. No registry is reachable, so the image is built FROM scratch around a
# root filesystem that `docker/build.sh` assembles (the release binary plus exactly the shared
# libraries it links, found with ldd). Build with:  docker/build.sh   (tags blazedb:latest)
FROM scratch
COPY docker/rootfs/ /
VOLUME ["/data"]
EXPOSE 7700 7701
ENTRYPOINT ["/usr/bin/blazedb"]
CMD ["node", "--data", "/data", "--api", "0.0.0.0:7700", "--listen", "/ip4/0.0.0.0/tcp/7701", "--no-mdns"]
