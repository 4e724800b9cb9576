"""The model of SPEC 4: visual backbone, language encoder, fusion, classifier, upsampling."""
