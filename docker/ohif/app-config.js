/**
 * OHIF for the compose stack (mounted at /usr/share/nginx/html/app-config.js) and for the viewer
 * test (tests/viewer/ohif.py serves it with the same OHIF version: tests/viewer/package.json).
 * Orthanc's DICOMweb is reached through the same origin: docker/ohif/dicomweb-proxy.conf serves the
 * viewer on port 3000 and forwards /dicom-web/ to orthanc:8042 with a read-only account, so the
 * browser needs no CORS and never sees Orthanc's passwords. Pleura's SR and SC appear as series
 * of the original study.
 */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (Pleura stack)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {
          enabled: true,
        },
      },
    },
  ],
};
