// Record the first script error (or console.error) on <body data-status>, for the headless-browser check.
window.dashboardErrors = [];
(function () {
  function record(message) {
    window.dashboardErrors.push(String(message));
    if (document.body) { document.body.setAttribute('data-status', 'error: ' + window.dashboardErrors[0]); }
  }
  window.addEventListener('error', function (event) { record(event.message || 'resource or script error'); }, true);
  var originalError = console.error;
  console.error = function () {
    record(Array.prototype.join.call(arguments, ' '));
    originalError.apply(console, arguments);
  };
})();
